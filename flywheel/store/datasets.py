"""Datasets on disk: ``<root>/<name>/<version>/part-*.parquet`` plus ``_meta.json``.

A version is written into a temporary folder and renamed into place, so readers
never see half a version, and a version folder never changes once it exists.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import uuid
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict

NAME_RE = re.compile(r"^[a-z][a-z0-9_]{0,62}$")
VERSION_RE = re.compile(r"^[a-z0-9_]{1,80}$")
NAME_RULE = (
    "a dataset name starts with a lowercase letter followed by up to 62 lowercase "
    "letters, digits or underscores (regex ^[a-z][a-z0-9_]{0,62}$)"
)
VERSION_RULE = "a version is 1 to 80 lowercase letters, digits or underscores (^[a-z0-9_]{1,80}$)"
ROWS_PER_PART = 200_000
META_FILE = "_meta.json"
FAILED_SUFFIX = "__failed"
# Tables in the catalog, so no dataset view may take these names.
RESERVED_NAMES = frozenset({"runs", "lineage", "models"})


class StoreError(RuntimeError):
    """Base class of the data store's errors."""


class InvalidDatasetName(ValueError):
    """A dataset name that does not follow the naming rule."""


class DatasetNotFound(StoreError):
    """The dataset or version does not exist."""


class DatasetVersionExists(StoreError):
    """The version already exists; versions are immutable."""


class CatalogBusy(StoreError):
    """Another process held the DuckDB catalog for too long."""


def data_root(root: Path | str | None = None) -> Path:
    """The data folder: ``root`` if given, else ``$FLYWHEEL_DATA_DIR``, else ``./data``."""
    if root is not None:
        return Path(root).absolute()
    env = os.environ.get("FLYWHEEL_DATA_DIR")
    return Path(env).absolute() if env else Path.cwd() / "data"


def _suggest_name(name: str) -> str:
    fixed = re.sub(r"[^a-z0-9_]+", "_", name.lower()).strip("_")
    if not fixed:
        return "dataset"
    if not fixed[0].isalpha():
        fixed = "d_" + fixed
    return fixed[:63]


def validate_name(name: str) -> str:
    """Return ``name`` if it is a valid dataset name, else raise InvalidDatasetName."""
    if isinstance(name, str) and NAME_RE.match(name) and name not in RESERVED_NAMES:
        return name
    text = name if isinstance(name, str) else str(name)
    suggestion = _suggest_name(text)
    if suggestion in RESERVED_NAMES:
        suggestion += "_data"
    raise InvalidDatasetName(
        f"invalid dataset name {name!r}: {NAME_RULE}, and not one of the catalog's "
        f"tables {sorted(RESERVED_NAMES)}; try {suggestion!r}"
    )


def failed_name(name: str) -> str:
    """Name of the dataset that keeps the rows of ``name`` that failed (raw text + error)."""
    return validate_name(validate_name(name) + FAILED_SUFFIX)


def _validate_version(version: str) -> str:
    if isinstance(version, str) and VERSION_RE.match(version):
        return version
    raise ValueError(f"invalid dataset version {version!r}: {VERSION_RULE}")


def new_version() -> str:
    """A fresh version string that sorts by creation time (UTC)."""
    now = datetime.now(UTC).strftime("%Y%m%d_%H%M%S_%f")
    return f"v{now}_{secrets.token_hex(2)}"


class DatasetRef(BaseModel):
    """One immutable version of a dataset on disk."""

    model_config = ConfigDict(frozen=True)

    name: str
    version: str
    path: str

    def files(self) -> list[str]:
        """Absolute paths of the parquet parts, in order."""
        return sorted(str(p) for p in Path(self.path).glob("part-*.parquet"))

    def to_arrow(self) -> pa.Table:
        """All rows as one pyarrow Table."""
        return pa.concat_tables([pq.read_table(f) for f in self.files()])

    def to_pandas(self) -> Any:
        """All rows as a pandas DataFrame."""
        return self.to_arrow().to_pandas()

    def to_hf(self, **kwargs: Any) -> Any:
        """A Hugging Face ``datasets.Dataset``; kwargs go to ``load_dataset``."""
        import datasets

        return datasets.load_dataset("parquet", data_files=self.files(), split="train", **kwargs)

    @property
    def meta(self) -> dict[str, Any]:
        """The version's ``_meta.json``."""
        return json.loads((Path(self.path) / META_FILE).read_text())

    @property
    def num_rows(self) -> int:
        """Number of rows in this version."""
        return int(self.meta["num_rows"])


def list_datasets(root: Path | None = None) -> list[str]:
    """Names of the datasets that have at least one version, sorted."""
    base = data_root(root)
    if not base.is_dir():
        return []
    return sorted(
        p.name
        for p in base.iterdir()
        if p.is_dir()
        and NAME_RE.match(p.name)
        and p.name not in RESERVED_NAMES
        and list_versions(p.name, root=base)
    )


def list_versions(name: str, root: Path | None = None) -> list[str]:
    """Versions of a dataset, sorted (the last one is the latest)."""
    folder = data_root(root) / validate_name(name)
    if not folder.is_dir():
        return []
    # Leftover ".tmp-*" folders from a crashed write never match VERSION_RE.
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and VERSION_RE.match(p.name))


def read_dataset(name: str, version: str | None = None, root: Path | None = None) -> DatasetRef:
    """The named version of a dataset, or its latest version."""
    base = data_root(root)
    versions = list_versions(name, root=base)
    if not versions:
        raise DatasetNotFound(
            f"no dataset {name!r} under {base}; datasets: {list_datasets(base) or 'none'}"
        )
    if version is None:
        version = versions[-1]
    elif version not in versions:
        raise DatasetNotFound(f"dataset {name!r} has no version {version!r}; versions: {versions}")
    return DatasetRef(name=name, version=version, path=str(base / name / version))


def _to_table(rows: Any, schema: pa.Schema | None) -> pa.Table:
    if isinstance(rows, pa.Table):
        return rows.cast(schema) if schema is not None else rows
    if type(rows).__module__.startswith("pandas"):
        return pa.Table.from_pandas(rows, schema=schema, preserve_index=False)
    rows = list(rows)
    if not rows and schema is None:
        raise ValueError("rows is empty: pass schema= so the dataset knows its columns")
    return pa.Table.from_pylist(rows, schema=schema)


def _input_record(ref: Any) -> dict[str, str]:
    from flywheel.store.models import input_record

    return input_record(ref)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_dataset(
    name: str,
    rows: Iterable[dict[str, Any]] | pa.Table | Any,
    *,
    produced_by: str | None = None,
    inputs: Sequence[Any] = (),
    version: str | None = None,
    root: Path | None = None,
    schema: pa.Schema | None = None,
) -> DatasetRef:
    """Write a new immutable version of a dataset and register it in the catalog.

    ``rows`` is an iterable of dicts, a pyarrow Table or a pandas DataFrame.
    """
    validate_name(name)
    version = new_version() if version is None else _validate_version(version)
    base = data_root(root)
    folder = base / name
    target = folder / version
    if target.exists():
        raise DatasetVersionExists(f"{name} version {version} already exists at {target}")

    table = _to_table(rows, schema)
    if table.num_columns == 0:
        raise ValueError("rows have no columns: pass schema= so the dataset knows its columns")

    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".tmp-{uuid.uuid4().hex}"
    tmp.mkdir()
    try:
        offsets = range(0, max(table.num_rows, 1), ROWS_PER_PART)
        for part, offset in enumerate(offsets):
            path = tmp / f"part-{part:05d}.parquet"
            pq.write_table(table.slice(offset, ROWS_PER_PART), path)
            _fsync(path)
        meta = {
            "name": name,
            "version": version,
            "created": datetime.now(UTC).isoformat(),
            "produced_by": produced_by,
            # DatasetRefs or ModelRefs (models record their kind)
            "inputs": [_input_record(r) for r in inputs],
            "num_rows": table.num_rows,
            "columns": {f.name: str(f.type) for f in table.schema},
        }
        with open(tmp / META_FILE, "w") as f:
            json.dump(meta, f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        _fsync(tmp)
        try:
            os.rename(tmp, target)
        except OSError as e:
            if target.exists():
                raise DatasetVersionExists(
                    f"{name} version {version} already exists at {target}"
                ) from e
            raise
        _fsync(folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

    ref = DatasetRef(name=name, version=version, path=str(target))
    # Imported here because the catalog module reads datasets through this module.
    from flywheel.store.catalog import register_version

    try:
        register_version(ref, root=base)
    except CatalogBusy as e:
        raise CatalogBusy(
            f"{e}; the data itself is safely written at {target} and the next "
            "refresh_catalog() registers it"
        ) from e
    return ref
