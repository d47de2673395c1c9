"""`reward/train`: a Bradley-Terry reward model or a shared-backbone ensemble from a store
dataset, published as a model version with its lineage. Wiring only; the methods are
`flywheel.reward_models.bradley_terry` and `flywheel.reward_models.ensemble`."""

from __future__ import annotations

import hashlib
import json
import logging
import random
from pathlib import Path
from typing import Literal

from prefect import task
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from flywheel.flows.tracking import (
    Deployment,
    earlier_model,
    length_figures,
    model_inputs,
    reuse_or_write,
    training_key,
)
from flywheel.llm import BackendSpec
from flywheel.llm.chat import PromptFormat
from flywheel.reward_models import bradley_terry, ensemble
from flywheel.reward_models.bradley_terry import (
    PAIR_COLUMNS,
    PreferenceDataError,
    RewardTrainingConfig,
    clean_preferences,
    pair_key,
    train_reward_model,
)
from flywheel.reward_models.ensemble import EnsembleConfig, train_ensemble
from flywheel.store import (
    DatasetRef,
    ModelRef,
    read_dataset,
    save_model_version,
    validate_name,
)
from flywheel.store.models import model_name_for, validate_model_name
from flywheel.world.bootstrap import model_dir, models_root
from flywheel.world.tasks import answer_preference_pairs

WORLD_PAIRS = "world_preference_pairs"
SOURCE = hashlib.sha256(
    b"".join(Path(m.__file__).read_bytes() for m in (bradley_terry, ensemble))
).hexdigest()


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


class RewardTrainParams(PairDataParams):
    """Parameters of `reward/train`."""

    dataset: str = Field(
        WORLD_PAIRS,
        description=f"store dataset with text columns prompt, chosen, rejected (optional "
        f"margin); {WORLD_PAIRS!r} is generated from the world when absent",
    )
    eval_fraction: float = Field(0.1, gt=0, lt=1)
    kind: Literal["bradley-terry", "ensemble"] = "bradley-terry"
    members: int = Field(3, ge=2, le=32, description="ensemble members (kind=ensemble)")
    base_model: str = Field(default_factory=default_backbone, description="backbone folder")
    epochs: float = Field(2.0, gt=0)
    learning_rate: float = Field(1e-3, gt=0)
    batch_size: int = Field(32, ge=1)
    max_length: int = Field(
        256, ge=8, description="tokens per prompt + answer, in training, evaluation and scoring"
    )
    world_pairs: int = Field(2000, ge=10, description=f"size of a generated {WORLD_PAIRS}")

    @model_validator(mode="after")
    def _name(self) -> RewardTrainParams:
        if self.model_name is None:
            suffix = "rm" if self.kind == "bradley-terry" else f"ensemble{self.members}"
            self.model_name = model_name_for(
                self.dataset, suffix, field="dataset", hint="or set model_name"
            )
        validate_model_name(self.model_name, field="model_name")
        return self


def _world_pairs(params: RewardTrainParams) -> DatasetRef:
    return reuse_or_write(
        WORLD_PAIRS,
        f"world:seed{params.seed}_n{params.world_pairs}",
        lambda: answer_preference_pairs(params.world_pairs, random.Random(params.seed)),
    )


def split_pairs(params: BaseModel, inputs: list[DatasetRef], rows: list[dict]) -> tuple:
    """Train and eval rows: the eval dataset, or a seeded hold-out (params.eval_fraction,
    params.seed) of `rows` (the train dataset's rows, read once by the caller).

    The hold-out is drawn from distinct pairs, and every copy of a pair goes to the
    side its pair went to, so held-out accuracy is never measured on a training pair.
    A group column (align/group-robust) is not part of the pair: the same prompt,
    chosen and rejected under two group labels is one comparison, and on both sides
    of the split it would still be a copy of a training pair."""
    if len(inputs) > 1:
        return rows, inputs[1].to_pandas().to_dict("records")
    source = f"dataset {inputs[0].name}@{inputs[0].version}"
    copies: dict[tuple, list[dict]] = {}  # rows per pair, in first-seen order
    for row in rows:
        copies.setdefault(pair_key(row), []).append(row)
    if len(copies) == 1:
        raise PreferenceDataError(one_pair_message(source, rows))
    pairs = list(copies.values())
    random.Random(params.seed).shuffle(pairs)
    cut = max(1, round(len(pairs) * params.eval_fraction))
    if len(pairs) - cut < 1:
        raise PreferenceDataError(
            f"{source}: {len(pairs)} distinct pair(s) leave nothing to train on after the "
            "eval hold-out; add pairs, lower eval_fraction or pass eval_dataset"
        )
    return [r for pair in pairs[cut:] for r in pair], [r for pair in pairs[:cut] for r in pair]


def one_pair_message(source: str, rows: list[dict]) -> str:
    """Why a dataset whose rows are all one pair cannot give a held-out split."""
    pair = ", ".join(f"{c} {str(rows[0].get(c))[:60]!r}" for c in PAIR_COLUMNS)
    return (
        f"{source}: all {len(rows)} row(s) are copies of one pair ({pair}); "
        "nothing can be held out that is not a copy of a training pair, so held-out "
        "accuracy would be measured on the training pair; add distinct pairs or pass "
        "eval_dataset"
    )


def copies_of_train(train_rows: list[dict], eval_rows: list[dict]) -> dict:
    """Eval rows that are copies of a training pair: a count and the first one."""
    seen = {pair_key(r) for r in train_rows}
    hits = [i for i, r in enumerate(eval_rows) if pair_key(r) in seen]
    first = {"example_row": hits[0], "example": eval_rows[hits[0]]} if hits else {}
    return {"count": len(hits), **first}


@task(name="check-inputs")
def check_inputs(params: RewardTrainParams) -> dict:
    """Fail before any model loads: backbone folder, columns, at least one usable pair.
    Returns the pinned dataset versions and the cleaning reports."""
    backbone = Path(params.base_model).expanduser()
    looks_like_hub_id = params.base_model.count("/") == 1 and params.base_model[0] not in "./~"
    if not backbone.is_dir() and not looks_like_hub_id:
        raise FileNotFoundError(
            f"base_model: no model folder at {backbone}; run `prefect deployment run "
            "world/bootstrap` for the world models, or pass a backbone folder"
        )
    if params.dataset == WORLD_PAIRS and params.dataset_version is None:
        inputs = [_world_pairs(params)]
    else:
        inputs = [read_dataset(params.dataset, params.dataset_version)]
    if params.eval_dataset:
        inputs.append(read_dataset(params.eval_dataset))
    source = f"dataset {inputs[0].name}@{inputs[0].version}"
    rows = inputs[0].to_pandas().to_dict("records")
    # Columns and usable rows first, so the error names the real problem.
    usable, report = clean_preferences(rows, source)
    if not params.eval_dataset and report["distinct"] == 1:
        raise PreferenceDataError(one_pair_message(f"{source} (usable rows)", usable))
    train_rows, eval_rows = split_pairs(params, inputs, rows)
    # The trainer cleans again; failing here means no model was loaded for nothing.
    train_kept, train_report = clean_preferences(train_rows, f"{source} (train)")
    eval_kept, eval_report = clean_preferences(eval_rows, f"{source} (eval)")
    # Only an explicit eval dataset can hold copies; they stay, but the figures say so.
    copies = copies_of_train(train_kept, eval_kept)
    if copies["count"]:
        logging.getLogger(__name__).warning(
            "eval dataset %s: %d of %d usable row(s) are copies of training pairs, e.g. row "
            "%d; its accuracy partly measures pairs the model was trained on",
            params.eval_dataset,
            copies["count"],
            len(eval_kept),
            copies["example_row"],
        )
    return {
        "inputs": inputs,
        "reports": {"train": train_report, "eval": eval_report},
        "eval copies of train pairs": copies,
    }


@task(name="train-reward-model")
def train(params: RewardTrainParams, data: dict, run_id: str) -> ModelRef:
    """Train and publish a model version; the same data, config and code reuse the last one."""
    key = training_key(
        params.model_dump_json(exclude={"model_name"}), data["inputs"], SOURCE, params.base_model
    )
    if earlier := earlier_model(params.model_name, key):
        return earlier
    inputs = data["inputs"]
    train_rows, eval_rows = split_pairs(params, inputs, inputs[0].to_pandas().to_dict("records"))

    def build(folder: Path) -> dict:
        common = dict(
            base_model=params.base_model,
            epochs=params.epochs,
            learning_rate=params.learning_rate,
            batch_size=params.batch_size,
            max_length=params.max_length,
            over_length=params.over_length,
            prompt_format=params.prompt_format,
            seed=params.seed,
        )
        if params.kind == "bradley-terry":
            config = RewardTrainingConfig(**common)
            figures = train_reward_model(train_rows, eval_rows, config, folder)
        else:
            config = EnsembleConfig(**common, members=params.members)
            figures = train_ensemble(train_rows, eval_rows, config, folder)
        return json.loads(json.dumps({**figures, "cache_key": key}, default=str))

    return save_model_version(
        params.model_name,
        build,
        kind=params.kind,
        produced_by=run_id,
        inputs=[*data["inputs"], *model_inputs(BackendSpec(model=params.base_model))],
    )


def _duplicates_markdown(data: dict) -> str:
    """Copies of pairs, with an example of each kind; empty when there are none."""

    def shown(row: dict) -> str:
        return json.dumps({c: row.get(c) for c in PAIR_COLUMNS}, default=str)[:200]

    lines = [
        f"- {split}: {entry['count']} row(s) are copies of an earlier pair ({entry['pairs']} "
        f"pair(s) have copies), e.g. row {entry['example_row']}: `{shown(entry['example'])}`"
        for split, report in data["reports"].items()
        if (entry := report["duplicates"])["count"]
    ]
    if (copies := data["eval copies of train pairs"])["count"]:
        lines.append(
            f"- eval: {copies['count']} row(s) are copies of a training pair, e.g. row "
            f"{copies['example_row']}: `{shown(copies['example'])}`"
        )
    return "## Duplicate pairs\n\n" + "\n".join(lines) if lines else ""


TRAIN_FLOW_DEFAULTS = RewardTrainParams()
TRAIN = Deployment("reward/train", "Reward model training", nightly_utc="0 3 * * *")


@TRAIN.flow
def train_flow(params: RewardTrainParams = TRAIN_FLOW_DEFAULTS) -> dict:
    """Train a reward model (Bradley-Terry, or a K-member ensemble) on preference pairs."""
    with TRAIN.run(params) as run:
        data = check_inputs(params)
        model = train(params, data, run.id)
        metrics = model.meta["metrics"]
        accuracy = metrics["eval_pairwise_accuracy"]
        dropped = {
            f"{split} rows dropped ({reason})": entry["count"]
            for split, report in data["reports"].items()
            for reason, entry in report["dropped"].items()
        }
        figures = {
            "model": f"{model.name}@{model.version}",
            "kind": params.kind,
            "reused earlier version": model.meta["produced_by"] != run.id,
            "train pairs": data["reports"]["train"]["kept"],
            "train pairs trained": metrics.get("trained_pairs"),
            "eval pairs": data["reports"]["eval"]["kept"],
            **dropped,
            "prompt format": metrics.get("prompt_format"),
            "pad token stand-in": metrics.get("pad_token_stand_in") or "none needed",
            **length_figures(metrics.get("length", {})),
            "train duplicate rows": data["reports"]["train"]["duplicates"]["count"],
            "eval duplicate rows": data["reports"]["eval"]["duplicates"]["count"],
            "eval rows copying a train pair": data["eval copies of train pairs"]["count"],
            "eval pairwise accuracy": accuracy if params.kind == "bradley-terry" else None,
            "eval pairwise accuracy (ensemble mean)": (
                accuracy["mean"] if params.kind == "ensemble" else None
            ),
            "train seconds": metrics["train_seconds"],
        }
        figures = {k: v for k, v in figures.items() if v is not None}
        examples = "\n".join(
            f"- {split}: {entry['count']} row(s) {reason}, e.g. row {entry['example_row']}: "
            f"`{json.dumps(entry['example'], default=str)[:200]}`"
            for split, report in data["reports"].items()
            for reason, entry in report["dropped"].items()
        )
        extra = f"## Rows kept out of training\n\n{examples}\n\n" if examples else ""
        extra += _duplicates_markdown(data)
        run.summary(figures, extra)
        return {"model": model.model_dump(), "figures": figures}
