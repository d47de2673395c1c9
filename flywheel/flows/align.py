"""`align/group-robust`: GR-DPO or GR-IPO on a grouped preference dataset, with the
plain DPO/IPO baseline trained on the same data in the same run. Wiring only; the
method is `flywheel.alignment.group_robust`, its reports `flywheel.alignment.group_reports`."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Literal

from prefect import task
from pydantic import Field, field_validator, model_validator

from flywheel.alignment import group_robust
from flywheel.alignment.group_reports import (
    evaluation_markdown,
    evaluation_rows,
    history_markdown,
    length_by_split,
    save_history,
)
from flywheel.alignment.group_robust import (
    GroupDataError,
    GroupRobustConfig,
    check_groups,
    train_group_robust,
)
from flywheel.flows import pair_training
from flywheel.flows.outputs import write_once
from flywheel.flows.pair_training import CheckedPairs
from flywheel.flows.tracking import Deployment, FlowRun, length_figures
from flywheel.store import ModelRef
from flywheel.store.models import model_name_for, validate_model_name
from flywheel.store.naming import new_version, validate_derived_version, validate_output_name
from flywheel.world.tasks import group_preference_pairs

WORLD_GROUP_PAIRS = "world_group_pairs"
DEFAULT_EVALUATION = "align_group_eval"
SOURCE = pair_training.code_hash(group_robust)


class GroupRobustParams(pair_training.PairDataParams):
    """Parameters of `align/group-robust`."""

    dataset: str = pair_training.dataset_field(
        WORLD_GROUP_PAIRS, "prompt, chosen, rejected and a group column"
    )
    eval_fraction: float = Field(0.2, gt=0, lt=1)
    group_column: str = Field("group", description="the column naming each pair's group")
    groups: list[str] | None = Field(
        None, description="groups that must have pairs; null: whatever groups the data has"
    )
    method: Literal["gr-dpo", "gr-ipo"] = "gr-dpo"
    baseline: bool = Field(True, description="also train plain DPO/IPO on the same data")
    evaluation_dataset: str = Field(
        DEFAULT_EVALUATION,
        description="output: per-method, per-group held-out figures (a version per model)",
    )
    base_model: str = Field(
        default_factory=pair_training.default_backbone, description="policy folder"
    )
    beta: float = Field(0.1, gt=0)
    max_length: int = Field(
        128, ge=8, description="tokens per prompt + answer, in training and evaluation"
    )
    learning_rate: float = Field(1e-4, gt=0)
    batch_size: int = Field(32, ge=2)
    epochs: float = Field(1.0, gt=0)
    eta_q: float = Field(0.5, ge=0, description="step size of the group weights")
    size_adjustment: float = Field(0.0, ge=0, description="C in l_g + C/sqrt(n_g)")
    chi: float = Field(1.0, ge=0, le=1, description="1: worst group only, 0: plain average")
    world_pairs: int = pair_training.world_pairs_field(1250, 20, WORLD_GROUP_PAIRS)

    @field_validator("evaluation_dataset")
    @classmethod
    def _evaluation_name(cls, name: str) -> str:
        return validate_output_name(name, field="evaluation_dataset")

    @model_validator(mode="after")
    def _name(self) -> GroupRobustParams:
        field, value = "model_name", self.model_name
        if self.model_name is None:
            field, value = "dataset", self.dataset
            self.model_name = model_name_for(
                self.dataset, self.method, field="dataset", hint="or set model_name"
            )
        validate_model_name(self.model_name, field="model_name")
        # the evaluation is written as version <model_name>_<model version>
        evaluation = f"{self.model_name}_{new_version()}".replace("-", "_")
        validate_derived_version(evaluation, field=field, value=value)
        return self

    def config(self, method: str) -> GroupRobustConfig:
        return pair_training.config_from(GroupRobustConfig, self, method=method)


@task(name="check-inputs")
def check_inputs(params: GroupRobustParams) -> CheckedPairs:
    """Fail before any model loads: policy folder, columns, group column, every group
    with pairs on both sides of the split. Returns the pinned inputs and data reports."""
    pair_training.check_base_model(params.base_model, "policy")
    inputs = pair_training.pinned_pairs(params, WORLD_GROUP_PAIRS, group_preference_pairs)
    source = pair_training.source_of(inputs[0])
    rows = inputs[0].to_pandas().to_dict("records")
    # the whole dataset first, so a missing column or group is named as such
    check_groups(rows, params.group_column, source, params.groups)
    train_rows, eval_rows = pair_training.split_pairs(params, inputs, rows)
    train, train_report = check_groups(
        train_rows, params.group_column, f"{source} (train)", params.groups
    )
    evaluation, eval_report = check_groups(
        eval_rows, params.group_column, f"{source} (eval)", params.groups
    )
    unseen = sorted({r["group"] for r in evaluation} - {r["group"] for r in train})
    if unseen:
        raise GroupDataError(
            f"{source}: eval group(s) {unseen} have no training pairs; add training pairs "
            "for them or leave them out of the evaluation"
        )
    return CheckedPairs(inputs, train_report, eval_report)


@task(name="train-group-robust")
def train(params: GroupRobustParams, data: CheckedPairs, run_id: str) -> ModelRef:
    """Train and publish the robust policy; the baseline's figures go in its metrics.
    The same data, parameters, code and base weights reuse the last version."""
    column, groups = params.group_column, params.groups

    def fit(train_rows: list[dict], eval_rows: list[dict], folder: Path) -> dict:
        config = params.config(params.method)
        report = train_group_robust(train_rows, eval_rows, config, folder, column, groups)
        save_history(report.pop("history"), folder, f"{params.method} on {data.inputs[0].name}")
        if params.baseline:
            plain = params.config(params.method.removeprefix("gr-"))
            with tempfile.TemporaryDirectory() as tmp:
                baseline = train_group_robust(train_rows, eval_rows, plain, tmp, column, groups)
            baseline.pop("history")
            report["baseline"] = baseline
        return report

    return pair_training.train_once(params, data.inputs, SOURCE, params.method, run_id, fit)


GROUP_ROBUST = Deployment("align/group-robust", "Group robust DPO/IPO", GroupRobustParams)


@GROUP_ROBUST.flow(check=check_inputs)
def group_robust_flow(params: GroupRobustParams, data: CheckedPairs, run: FlowRun) -> dict:
    """Group robust preference optimisation (GR-DPO/GR-IPO) against plain DPO/IPO."""
    model = train(params, data, run.id)
    rows = evaluation_rows(model.meta["metrics"], f"{model.name}@{model.version}")
    evaluation, _ = write_once(
        params.evaluation_dataset,
        rows,
        # one evaluation per model version: a re-run of the same version reuses it
        version=f"{model.name}_{model.version}".replace("-", "_"),
        produced_by=run.id,
        inputs=[model],
    )
    metrics = model.meta["metrics"]
    held = metrics["held_out"]
    figures = {
        "model": f"{model.name}@{model.version}",
        "reused earlier version": model.meta["produced_by"] != run.id,
        "evaluation": f"{evaluation.name}@{evaluation.version}",
        "train pairs per group": json.dumps(data.train_report["group_sizes"]),
        f"{params.method} worst group": held["worst_group"],
        f"{params.method} worst-group accuracy": held["worst_group_accuracy"],
        f"{params.method} accuracy": held["accuracy"],
        "final group weights": json.dumps(
            {g: round(w, 3) for g, w in metrics["final_group_weights"].items()}
        ),
        "steps/s": metrics["steps_per_second"],
        **length_figures(length_by_split(metrics.get("length", {}))),
    }
    if baseline := metrics.get("baseline"):
        plain = baseline["held_out"]
        figures |= {
            f"{baseline['method']} worst-group accuracy": plain["worst_group_accuracy"],
            f"{baseline['method']} accuracy": plain["accuracy"],
            "steps/s ratio (robust / plain)": metrics["steps_per_second"]
            / baseline["steps_per_second"],
        }
    extra = "## Held-out pairs per group\n\n" + evaluation_markdown(rows)
    extra += "\n\n## Group weights and losses over training\n\n"
    extra += history_markdown(Path(model.path))
    run.summary(figures, extra)
    return {"model": model.model_dump(), "figures": figures}
