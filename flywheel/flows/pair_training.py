"""What the flows that train a model on preference pairs share (`reward/train`,
`align/group-robust`): their common parameters, the pinned pairs and their held-out
split, and training once per data, parameters, code and base weights."""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from types import ModuleType
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, field_validator

from flywheel.flows.outputs import reuse_or_write
from flywheel.flows.tracking import earlier_model, model_inputs, training_key
from flywheel.llm import BackendSpec
from flywheel.llm.chat import PromptFormat
from flywheel.reward_models.pairs import hold_out
from flywheel.store import DatasetRef, ModelRef, read_dataset, save_model_version, validate_name
from flywheel.world.bootstrap import model_dir, models_root

Config = TypeVar("Config", bound=BaseModel)


def default_backbone() -> str:
    return str(model_dir(models_root(), "small"))


class PairDataParams(BaseModel):
    """What the flows that train on preference pairs (`reward/train`,
    `align/group-robust`) share: which pairs, the hold-out, and how pairs are tokenized.
    Each flow states its own `dataset`, `eval_fraction` and `max_length` defaults."""

    model_config = ConfigDict(extra="forbid")

    dataset_version: str | None = Field(None, description="null: the latest version")
    eval_dataset: str | None = Field(
        None, description="held-out pairs; null: hold out eval_fraction of `dataset`"
    )
    model_name: str | None = Field(None, description="registered model name; null: derived")
    over_length: Literal["truncate", "drop"] = Field(
        "truncate",
        description="a longer pair: cut (the prompt's start first) or leave out; counted",
    )
    prompt_format: PromptFormat = Field(
        "auto",
        description="'chat': render pairs with the model's chat template; 'raw': text as "
        "it is; 'auto': chat when the model has a template",
    )
    seed: int = 0

    @field_validator("dataset", "eval_dataset", check_fields=False)
    @classmethod
    def _dataset_name(cls, name: str | None) -> str | None:
        return None if name is None else validate_name(name)


def dataset_field(world: str, columns: str) -> Any:
    """The `dataset` parameter: its default is the world's dataset `world`, which
    `pinned_pairs` generates when it is absent."""
    return Field(
        world,
        description=f"store dataset with text columns {columns}; {world!r} is generated "
        "from the world when absent",
    )


def world_pairs_field(default: int, least: int, world: str) -> Any:
    """The `world_pairs` parameter: how many pairs a generated `world` dataset has."""
    return Field(default, ge=least, description=f"size of a generated {world}")


def check_base_model(base_model: str, role: str, hub_name_ok: bool = False) -> None:
    """Before any model loads: `base_model` is a model folder (or, where `hub_name_ok`,
    names a hub model as org/name); FileNotFoundError naming the field otherwise."""
    folder = Path(base_model).expanduser()
    hub_name = hub_name_ok and base_model.count("/") == 1 and base_model[0] not in "./~"
    if not folder.is_dir() and not hub_name:
        raise FileNotFoundError(
            f"base_model: no model folder at {folder}; run `prefect deployment run "
            f"world/bootstrap` for the world models, or pass a {role} folder"
        )


def config_from(config: type[Config], params: BaseModel, **overrides: object) -> Config:
    """A method's config from the flow parameters of the same names (the method's own
    defaults for the rest), then `overrides`."""
    given = params.model_dump(include=set(config.model_fields))
    return config.model_validate({**given, **overrides})


def code_hash(*modules: ModuleType) -> str:
    """A hash of the methods' source files: changed code trains a new version."""
    return hashlib.sha256(b"".join(Path(m.__file__).read_bytes() for m in modules)).hexdigest()


@dataclass(frozen=True)
class CheckedPairs:
    """What a pair flow's check-inputs task hands on: the pinned dataset versions (the
    pairs, then the eval dataset when one is given) and each split's data report."""

    inputs: tuple[DatasetRef, ...]
    train_report: dict
    eval_report: dict

    @property
    def reports(self) -> dict[str, dict]:
        return {"train": self.train_report, "eval": self.eval_report}


def pinned_pairs(
    params: PairDataParams, world: str, make: Callable[[int, random.Random], list[dict]]
) -> tuple[DatasetRef, ...]:
    """The versions a run reads: the pairs (the world's dataset `world` is generated with
    `make(params.world_pairs, rng)` once per seed and size), then the eval dataset."""
    if params.dataset == world and params.dataset_version is None:
        producer = f"world:seed{params.seed}_n{params.world_pairs}"
        rows = partial(make, params.world_pairs, random.Random(params.seed))
        pairs = reuse_or_write(world, producer, rows)
    else:
        pairs = read_dataset(params.dataset, params.dataset_version)
    return (pairs, read_dataset(params.eval_dataset)) if params.eval_dataset else (pairs,)


def source_of(ref: DatasetRef) -> str:
    return f"dataset {ref.name}@{ref.version}"


def split_pairs(
    params: PairDataParams, inputs: Sequence[DatasetRef], rows: list[dict]
) -> tuple[list[dict], list[dict]]:
    """Train and eval rows: the eval dataset's rows, or a seeded hold-out
    (params.eval_fraction, params.seed) of `rows`, the pairs' rows read once by the
    caller (see `flywheel.reward_models.pairs.hold_out`)."""
    if len(inputs) > 1:
        return rows, inputs[1].to_pandas().to_dict("records")
    return hold_out(rows, params.eval_fraction, params.seed, source_of(inputs[0]))


def train_once(
    params: PairDataParams,
    inputs: tuple[DatasetRef, ...],
    sources: str,
    kind: str,
    run_id: str,
    fit: Callable[[list[dict], list[dict], Path], dict],
) -> ModelRef:
    """Publish a version of params.model_name trained by `fit(train_rows, eval_rows,
    folder)` (its figures become the version's metrics), or return the version the same
    data, parameters, code (`sources`) and base weights published before."""
    key = training_key(
        params.model_dump_json(exclude={"model_name"}), inputs, sources, params.base_model
    )
    if earlier := earlier_model(params.model_name, key):
        return earlier
    train_rows, eval_rows = split_pairs(params, inputs, inputs[0].to_pandas().to_dict("records"))

    def build(folder: Path) -> dict:
        figures = fit(train_rows, eval_rows, folder)
        return json.loads(json.dumps({**figures, "cache_key": key}, default=str))

    return save_model_version(
        params.model_name,
        build,
        kind=kind,
        produced_by=run_id,
        inputs=[*inputs, *model_inputs(BackendSpec(model=params.base_model))],
    )
