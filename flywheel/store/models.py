"""Trained models on disk: ``<root>/_models/<name>/<version>/`` plus ``_model.json``.

A model version is built in a temporary folder and renamed into place, so a crash
never leaves half a model where a reader would load it, and a version never changes
once it exists. The catalog's ``models`` table and
``lineage`` rows say which run made each version from which datasets and models.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

from flywheel.names import SHORT_NAME_MAX_LENGTH, SHORT_NAME_RULE, is_short_name
from flywheel.store.datasets import DatasetRef
from flywheel.store.naming import (
    VERSION_RE,
    StoreError,
    data_root,
    derived_error,
    subfolders,
)

MODELS_DIR = "_models"
MODEL_META = "_model.json"
MODEL_NAME_RULE = f"a model name is {SHORT_NAME_RULE}"


class ModelNotRegistered(StoreError):
    """No registered model (or version) of that name."""


class ModelRef(BaseModel):
    """One immutable version of a trained model."""

    model_config = ConfigDict(frozen=True)

    name: str
    version: str
    path: str

    @property
    def meta(self) -> dict[str, Any]:
        """The version's ``_model.json``: kind, producing run, inputs, metrics."""
        return json.loads((Path(self.path) / MODEL_META).read_text())


def models_dir(root: Path | str | None = None) -> Path:
    return data_root(root) / MODELS_DIR


def validate_model_name(name: str, field: str | None = None) -> str:
    """Return ``name`` if it is a valid model name, else raise (naming ``field`` if given)."""
    if is_short_name(name):
        return name
    prefix = f"{field}: " if field else ""
    raise ValueError(f"{prefix}invalid model name {name!r}: {MODEL_NAME_RULE}")


def validate_derived_model_name(name: str, *, field: str, value: str, hint: str = "") -> str:
    """Check a model name that a flow builds from its parameter ``field`` (= ``value``), so
    a name the run could only refuse at its end is refused before the run starts."""
    if is_short_name(name):
        return name
    problem = derived_error(
        "model name",
        name,
        field=field,
        value=value,
        limit=SHORT_NAME_MAX_LENGTH,
        rule=MODEL_NAME_RULE,
    )
    raise ValueError(problem + (f"; {hint}" if hint else ""))


def model_name_for(dataset: str, suffix: str, *, field: str, hint: str = "") -> str:
    """The model name a flow derives from a dataset name: `my_pairs` + `rm` -> `my-pairs-rm`,
    checked as the parameter ``field`` (= ``dataset``)."""
    name = f"{dataset.replace('_', '-')}-{suffix}"
    return validate_derived_model_name(name, field=field, value=dataset, hint=hint)


def list_model_versions(name: str, root: Path | None = None) -> list[str]:
    """Registered versions of a model, sorted (the last one is the latest)."""
    return subfolders(
        models_dir(root) / validate_model_name(name),
        lambda p: VERSION_RE.fullmatch(p.name) and (p / MODEL_META).exists(),
    )


def list_models(root: Path | None = None) -> list[str]:
    return subfolders(
        models_dir(root),
        lambda p: is_short_name(p.name) and list_model_versions(p.name, root),
    )


def read_model(name: str, version: str | None = None, root: Path | None = None) -> ModelRef:
    """The named version of a registered model, or its latest."""
    versions = list_model_versions(name, root)
    if not versions:
        raise ModelNotRegistered(
            f"no registered model {name!r} under {models_dir(root)}; "
            f"models: {list_models(root) or 'none'} (train one with `reward/train`)"
        )
    version = version or versions[-1]
    if version not in versions:
        raise ModelNotRegistered(f"model {name!r} has no version {version!r}; versions: {versions}")
    return ModelRef(name=name, version=version, path=str(models_dir(root) / name / version))


class FileRef(BaseModel):
    """A file or folder outside the store that a dataset version was made from (an import)."""

    model_config = ConfigDict(frozen=True)

    path: str  # absolute
    sha256: str  # hex digest of its bytes (of a folder: its files' names and bytes)


def input_record(ref: DatasetRef | ModelRef | FileRef) -> dict[str, str]:
    """An input as the meta files and the catalog's lineage rows record it."""
    if isinstance(ref, FileRef):
        return {"kind": "file", "name": ref.path, "version": f"sha256:{ref.sha256}"}
    kind = "model" if isinstance(ref, ModelRef) else "dataset"
    return {"kind": kind, "name": ref.name, "version": ref.version}
