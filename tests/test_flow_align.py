"""`align/group-robust` under a real Prefect server: the policy, its baseline, lineage,
the evaluation dataset and plot, reuse, and bad input stopped before training."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from flywheel.alignment.group_robust import GroupDataError
from flywheel.flows.align import GroupRobustParams, group_robust_flow
from flywheel.store import read_dataset, read_model, sql, write_dataset
from flywheel.world.tasks import group_preference_pairs
from tests.helpers.prefect_reads import read_artifact


def params(world_models: Path, **kw) -> GroupRobustParams:
    defaults = dict(base_model=str(world_models / "world-small"), world_pairs=200, batch_size=16)
    return GroupRobustParams(**{**defaults, **kw})


def test_group_robust_flow_publishes_policy_baseline_and_plot(prefect_api, world_models, data_dir):
    out = group_robust_flow(params(world_models))
    model = read_model("world-group-pairs-gr-dpo")
    assert out["model"]["version"] == model.version
    metrics = model.meta["metrics"]
    assert metrics["method"] == "gr-dpo" and metrics["baseline"]["method"] == "dpo"
    assert (Path(model.path) / "group_weights.png").read_bytes()[:4] == b"\x89PNG"
    assert (Path(model.path) / "model.safetensors").exists()

    evaluation = read_dataset("align_group_eval").to_pandas()
    assert sorted(evaluation["method"].unique()) == ["dpo", "gr-dpo"]
    assert sorted(evaluation["group"].unique()) == ["plain", "spaced"]
    assert evaluation["worst_group"].sum() == 2  # one worst group per method
    assert out["figures"]["gr-dpo worst-group accuracy"] == pytest.approx(
        evaluation[(evaluation.method == "gr-dpo")]["accuracy"].min()
    )

    lineage = sql("select dataset, input_dataset, input_kind from lineage order by dataset")
    assert ["world-group-pairs-gr-dpo", "world_group_pairs", "dataset"] in lineage.values.tolist()
    assert ["world-group-pairs-gr-dpo", "world-small", "model"] in lineage.values.tolist()
    assert ["align_group_eval", "world-group-pairs-gr-dpo", "model"] in lineage.values.tolist()
    artifact = read_artifact("align-group-robust")
    assert (
        "Held-out pairs per group" in artifact
        and "| q spaced |" in artifact
        and "data:image/png;base64," in artifact
    )

    again = group_robust_flow(params(world_models))
    assert again["figures"]["reused earlier version"] is True
    assert len(sql("select * from models")) == 1


def test_bad_input_fails_before_training(prefect_api, world_models, data_dir):
    pairs = group_preference_pairs(60, random.Random(0))
    write_dataset("no_groups", [{k: v for k, v in r.items() if k != "group"} for r in pairs])
    with pytest.raises(GroupDataError, match="group column 'group' missing"):
        group_robust_flow(params(world_models, dataset="no_groups"))
    write_dataset("two_groups", pairs)
    with pytest.raises(GroupDataError, match=r"\['experts'\] have no usable pairs"):
        group_robust_flow(
            params(world_models, dataset="two_groups", groups=["plain", "spaced", "experts"])
        )
    write_dataset("one_group", [r for r in pairs if r["group"] == "plain"])
    with pytest.raises(GroupDataError, match="at least two groups"):
        group_robust_flow(params(world_models, dataset="one_group"))
    with pytest.raises(FileNotFoundError, match="base_model: no model folder"):
        group_robust_flow(params(world_models, base_model=str(world_models / "missing")))
    assert not (data_dir / "_models").exists() or not any((data_dir / "_models").iterdir())
