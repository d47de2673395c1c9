"""`align/group-robust`: GR-DPO or GR-IPO on a grouped preference dataset, with the
plain DPO/IPO baseline trained on the same data in the same run. Wiring only; the
method is `flywheel.alignment.group_robust`."""

from __future__ import annotations

import base64
import hashlib
import json
import random
import tempfile
from pathlib import Path
from typing import Literal

from prefect import task
from pydantic import Field, field_validator, model_validator

from flywheel.alignment import group_robust
from flywheel.alignment.group_robust import (
    GroupDataError,
    GroupRobustConfig,
    check_groups,
    plot_history,
    train_group_robust,
)
from flywheel.flows.reward import PairDataParams, default_backbone, split_pairs
from flywheel.flows.tracking import (
    Deployment,
    earlier_model,
    length_figures,
    model_inputs,
    reuse_or_write,
    training_key,
    write_once,
)
from flywheel.llm import BackendSpec
from flywheel.store import ModelRef, read_dataset, save_model_version
from flywheel.store.datasets import new_version, validate_derived_version, validate_output_name
from flywheel.store.models import model_name_for, validate_model_name
from flywheel.world.tasks import group_preference_pairs

WORLD_GROUP_PAIRS = "world_group_pairs"
DEFAULT_EVALUATION = "align_group_eval"
SOURCE = hashlib.sha256(Path(group_robust.__file__).read_bytes()).hexdigest()
PLOT = "group_weights.png"


class GroupRobustParams(PairDataParams):
    """Parameters of `align/group-robust`."""

    dataset: str = Field(
        WORLD_GROUP_PAIRS,
        description=f"store dataset with text columns prompt, chosen, rejected and a group "
        f"column; {WORLD_GROUP_PAIRS!r} is generated from the world when absent",
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
    base_model: str = Field(default_factory=default_backbone, description="policy folder")
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
    world_pairs: int = Field(1250, ge=20, description=f"size of a generated {WORLD_GROUP_PAIRS}")

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
        return GroupRobustConfig(
            method=method,
            **self.model_dump(
                include={
                    "base_model",
                    "beta",
                    "learning_rate",
                    "batch_size",
                    "epochs",
                    "eta_q",
                    "size_adjustment",
                    "chi",
                    "seed",
                    "max_length",
                    "over_length",
                    "prompt_format",
                }
            ),
        )


@task(name="check-inputs")
def check_inputs(params: GroupRobustParams) -> dict:
    """Fail before any model loads: policy folder, columns, group column, every group
    with pairs on both sides of the split. Returns the pinned inputs and data reports."""
    if not Path(params.base_model).expanduser().is_dir():
        raise FileNotFoundError(
            f"base_model: no model folder at {params.base_model}; run `prefect deployment "
            "run world/bootstrap` for the world models, or pass a policy folder"
        )
    if params.dataset == WORLD_GROUP_PAIRS and params.dataset_version is None:
        inputs = [
            reuse_or_write(
                WORLD_GROUP_PAIRS,
                f"world:seed{params.seed}_n{params.world_pairs}",
                lambda: group_preference_pairs(params.world_pairs, random.Random(params.seed)),
            )
        ]
    else:
        inputs = [read_dataset(params.dataset, params.dataset_version)]
    if params.eval_dataset:
        inputs.append(read_dataset(params.eval_dataset))
    source = f"dataset {inputs[0].name}@{inputs[0].version}"
    rows = inputs[0].to_pandas().to_dict("records")
    # the whole dataset first, so a missing column or group is named as such
    check_groups(rows, params.group_column, source, params.groups)
    train_rows, eval_rows = split_pairs(params, inputs, rows)
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
    return {"inputs": inputs, "reports": {"train": train_report, "eval": eval_report}}


def _history_markdown(folder: Path, rows: int = 10) -> str:
    """About `rows` steps of the weights' history as a table, then the PNG inline (so
    the artifact shows it without a file server)."""
    history = json.loads((folder / "group_history.json").read_text())
    groups = sorted(history[0]["weights"]) if history else []
    lines = [
        "| step | " + " | ".join(f"q {g}" for g in groups) + " | worst group (batch loss) |",
        "|---" * (len(groups) + 2) + "|",
    ]
    for entry in history[:: max(1, len(history) // rows)] + history[-1:]:
        worst = max(entry["loss"], key=entry["loss"].get)
        weights = " | ".join(f"{entry['weights'][g]:.3f}" for g in groups)
        lines.append(f"| {entry['step']} | {weights} | {worst} ({entry['loss'][worst]:.3f}) |")
    encoded = base64.b64encode((folder / PLOT).read_bytes()).decode()
    return "\n".join(lines) + f"\n\n![group weights and losses](data:image/png;base64,{encoded})"


@task(name="train-group-robust")
def train(params: GroupRobustParams, data: dict, run_id: str) -> ModelRef:
    """Train and publish the robust policy; the baseline's figures go in its metrics.
    The same data, parameters, code and base weights reuse the last version."""
    inputs = [*data["inputs"], *model_inputs(BackendSpec(model=params.base_model))]
    key = training_key(
        params.model_dump_json(exclude={"model_name"}), data["inputs"], SOURCE, params.base_model
    )
    if earlier := earlier_model(params.model_name, key):
        return earlier
    rows = data["inputs"][0].to_pandas().to_dict("records")
    train_rows, eval_rows = split_pairs(params, data["inputs"], rows)

    def build(folder: Path) -> dict:
        column, groups = params.group_column, params.groups
        report = train_group_robust(
            train_rows, eval_rows, params.config(params.method), folder, column, groups
        )
        history = report.pop("history")
        (folder / "group_history.json").write_text(json.dumps(history))
        plot_history(history, folder / PLOT, f"{params.method} on {data['inputs'][0].name}")
        if params.baseline:
            plain = params.method.removeprefix("gr-")
            with tempfile.TemporaryDirectory() as tmp:
                baseline = train_group_robust(
                    train_rows, eval_rows, params.config(plain), tmp, column, groups
                )
            baseline.pop("history")
            report["baseline"] = baseline
        return json.loads(json.dumps({**report, "cache_key": key}, default=str))

    return save_model_version(
        params.model_name, build, kind=params.method, produced_by=run_id, inputs=inputs
    )


def _length_figures(length: dict) -> dict:
    """What was cut or left out for length, overall and per group, train and eval."""
    per_split: dict[str, dict] = {}
    for split, report in length.items():
        per_split[split] = report["all"]
        for group, figures in report.get("by_group", {}).items():
            per_split[f"{split} group {group}"] = figures
    return length_figures(per_split)


def evaluation_rows(model: ModelRef) -> list[dict]:
    """One row per method and group: held-out pairs, accuracy, loss, worst-group flag."""
    metrics = model.meta["metrics"]
    rows = []
    for report in (metrics, metrics.get("baseline")):
        if report is None:
            continue
        held = report["held_out"]
        for group, figures in held["groups"].items():
            rows.append(
                {
                    "model": f"{model.name}@{model.version}",
                    "method": report["method"],
                    "group": group,
                    "pairs": figures["pairs"],
                    "accuracy": figures["accuracy"],
                    "loss": figures["loss"],
                    "worst_group": group == held["worst_group"],
                    "final_group_weight": (report["final_group_weights"] or {}).get(group),
                }
            )
    return rows


GROUP_ROBUST_FLOW_DEFAULTS = GroupRobustParams()
GROUP_ROBUST = Deployment(
    "align/group-robust", "Group robust preference optimisation", nightly_utc="0 5 * * *"
)


@GROUP_ROBUST.flow
def group_robust_flow(params: GroupRobustParams = GROUP_ROBUST_FLOW_DEFAULTS) -> dict:
    """Group robust preference optimisation (GR-DPO/GR-IPO) against plain DPO/IPO."""
    with GROUP_ROBUST.run(params) as run:
        data = check_inputs(params)
        model = train(params, data, run.id)
        evaluation, _ = write_once(
            params.evaluation_dataset,
            evaluation_rows(model),
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
            "train pairs per group": json.dumps(data["reports"]["train"]["group_sizes"]),
            f"{params.method} worst group": held["worst_group"],
            f"{params.method} worst-group accuracy": held["worst_group_accuracy"],
            f"{params.method} accuracy": held["accuracy"],
            "final group weights": json.dumps(
                {g: round(w, 3) for g, w in metrics["final_group_weights"].items()}
            ),
            "steps/s": metrics["steps_per_second"],
            **_length_figures(metrics.get("length", {})),
        }
        if baseline := metrics.get("baseline"):
            plain = baseline["held_out"]
            figures |= {
                f"{baseline['method']} worst-group accuracy": plain["worst_group_accuracy"],
                f"{baseline['method']} accuracy": plain["accuracy"],
                "steps/s ratio (robust / plain)": metrics["steps_per_second"]
                / baseline["steps_per_second"],
            }
        lines = [
            "| method | group | pairs | accuracy | loss | weight |",
            "|---|---|---|---|---|---|",
        ]
        for row in evaluation_rows(model):
            weight = "" if row["final_group_weight"] is None else f"{row['final_group_weight']:.3f}"
            lines.append(
                f"| {row['method']} | {row['group']} | {row['pairs']} | {row['accuracy']:.3f} "
                f"| {row['loss']:.3f} | {weight} |"
            )
        extra = "## Held-out pairs per group\n\n" + "\n".join(lines)
        extra += "\n\n## Group weights and losses over training\n\n"
        extra += _history_markdown(Path(model.path))
        run.summary(figures, extra)
        return {"model": model.model_dump(), "figures": figures}
