"""`reward/train`: a Bradley-Terry reward model or a shared-backbone ensemble from a store
dataset, published as a model version with its lineage. Wiring only; the methods are
`flywheel.reward_models.bradley_terry` and `flywheel.reward_models.ensemble`."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from prefect import task
from pydantic import Field, model_validator

from flywheel.flows import pair_training
from flywheel.flows.pair_training import default_backbone, split_pairs
from flywheel.flows.tracking import Deployment, FlowRun, length_figures
from flywheel.reward_models import bradley_terry, ensemble
from flywheel.reward_models.bradley_terry import (
    PAIR_COLUMNS,
    PreferenceDataError,
    RewardTrainingConfig,
    clean_preferences,
    train_reward_model,
)
from flywheel.reward_models.ensemble import EnsembleConfig, train_ensemble
from flywheel.reward_models.pairs import copies_of_train, one_pair_message
from flywheel.store import ModelRef
from flywheel.store.models import model_name_for, validate_model_name
from flywheel.world.tasks import answer_preference_pairs

WORLD_PAIRS = "world_preference_pairs"
SOURCE = pair_training.code_hash(bradley_terry, ensemble)


class RewardTrainParams(pair_training.PairDataParams):
    """Parameters of `reward/train`."""

    dataset: str = pair_training.dataset_field(
        WORLD_PAIRS, "prompt, chosen, rejected (optional margin)"
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
    world_pairs: int = pair_training.world_pairs_field(2000, 10, WORLD_PAIRS)

    @model_validator(mode="after")
    def _name(self) -> RewardTrainParams:
        if self.model_name is None:
            suffix = "rm" if self.kind == "bradley-terry" else f"ensemble{self.members}"
            self.model_name = model_name_for(
                self.dataset, suffix, field="dataset", hint="or set model_name"
            )
        validate_model_name(self.model_name, field="model_name")
        return self


@dataclass(frozen=True)
class RewardInputs(pair_training.CheckedPairs):
    """The checked pairs, and the copies of training pairs among the eval rows."""

    eval_copies: dict


@task(name="check-inputs")
def check_inputs(params: RewardTrainParams) -> RewardInputs:
    """Fail before any model loads: backbone folder, columns, at least one usable pair.
    Returns the pinned dataset versions and the cleaning reports."""
    pair_training.check_base_model(params.base_model, "backbone", hub_name_ok=True)
    inputs = pair_training.pinned_pairs(params, WORLD_PAIRS, answer_preference_pairs)
    source = pair_training.source_of(inputs[0])
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
    return RewardInputs(inputs, train_report, eval_report, eval_copies=copies)


@task(name="train-reward-model")
def train(params: RewardTrainParams, data: RewardInputs, run_id: str) -> ModelRef:
    """Train and publish a model version; the same data, config and code reuse the last one."""

    def fit(train_rows: list[dict], eval_rows: list[dict], folder: Path) -> dict:
        if params.kind == "bradley-terry":
            config = pair_training.config_from(RewardTrainingConfig, params)
            return train_reward_model(train_rows, eval_rows, config, folder)
        config = pair_training.config_from(EnsembleConfig, params)
        return train_ensemble(train_rows, eval_rows, config, folder)

    return pair_training.train_once(params, data.inputs, SOURCE, params.kind, run_id, fit)


def _duplicates_markdown(data: RewardInputs) -> str:
    """Copies of pairs, with an example of each kind; empty when there are none."""

    def shown(row: dict) -> str:
        return json.dumps({c: row.get(c) for c in PAIR_COLUMNS}, default=str)[:200]

    lines = [
        f"- {split}: {entry['count']} row(s) are copies of an earlier pair ({entry['pairs']} "
        f"pair(s) have copies), e.g. row {entry['example_row']}: `{shown(entry['example'])}`"
        for split, report in data.reports.items()
        if (entry := report["duplicates"])["count"]
    ]
    if (copies := data.eval_copies)["count"]:
        lines.append(
            f"- eval: {copies['count']} row(s) are copies of a training pair, e.g. row "
            f"{copies['example_row']}: `{shown(copies['example'])}`"
        )
    return "## Duplicate pairs\n\n" + "\n".join(lines) if lines else ""


TRAIN = Deployment("reward/train", "Reward model training", RewardTrainParams)


@TRAIN.flow(check=check_inputs)
def train_flow(params: RewardTrainParams, data: RewardInputs, run: FlowRun) -> dict:
    """Train a reward model (Bradley-Terry, or a K-member ensemble) on preference pairs."""
    model = train(params, data, run.id)
    metrics = model.meta["metrics"]
    accuracy = metrics["eval_pairwise_accuracy"]
    dropped = {
        f"{split} rows dropped ({reason})": entry["count"]
        for split, report in data.reports.items()
        for reason, entry in report["dropped"].items()
    }
    figures = {
        "model": f"{model.name}@{model.version}",
        "kind": params.kind,
        "reused earlier version": model.meta["produced_by"] != run.id,
        "train pairs": data.train_report["kept"],
        "train pairs trained": metrics.get("trained_pairs"),
        "eval pairs": data.eval_report["kept"],
        **dropped,
        "prompt format": metrics.get("prompt_format"),
        "pad token stand-in": metrics.get("pad_token_stand_in") or "none needed",
        **length_figures(metrics.get("length", {})),
        "train duplicate rows": data.train_report["duplicates"]["count"],
        "eval duplicate rows": data.eval_report["duplicates"]["count"],
        "eval rows copying a train pair": data.eval_copies["count"],
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
        for split, report in data.reports.items()
        for reason, entry in report["dropped"].items()
    )
    extra = f"## Rows kept out of training\n\n{examples}\n\n" if examples else ""
    extra += _duplicates_markdown(data)
    run.summary(figures, extra)
    return {"model": model.model_dump(), "figures": figures}
