"""`reward/train` under a real Prefect server: model versions, lineage, reuse, bad input."""

from __future__ import annotations

from pathlib import Path

import pytest

from flywheel.flows.reward import RewardTrainParams, train_flow
from flywheel.reward_models.bradley_terry import PreferenceDataError, RewardModel
from flywheel.reward_models.ensemble import EnsembleRewardModel
from flywheel.store import read_model, sql, write_dataset
from tests.helpers.prefect_reads import read_artifact


def params(world_models: Path, **kw) -> RewardTrainParams:
    defaults = dict(base_model=str(world_models / "world-small"), world_pairs=300, epochs=1.0)
    return RewardTrainParams(**{**defaults, **kw})


def test_train_publishes_model_with_lineage_and_reuses_it(prefect_api, world_models, data_dir):
    out = train_flow(params(world_models))
    model = read_model("world-preference-pairs-rm")
    assert out["model"]["version"] == model.version
    assert out["figures"]["train pairs"] == 270 and out["figures"]["eval pairs"] == 30
    assert 0 <= model.meta["metrics"]["eval_pairwise_accuracy"] <= 1
    scores = RewardModel(model.path).score(["copy abc =", "copy abc ="], ["abc", "cba"])
    assert len(scores) == 2

    row = sql("select * from models").iloc[0].to_dict()
    runs = sql("select run_id, flow, status from runs")
    assert row["produced_by"] == runs["run_id"][0] and runs["status"][0] == "completed"
    lineage = sql("select input_dataset, input_kind from lineage where kind = 'model'")
    # the pairs and the backbone the head was trained on
    assert sorted(lineage.values.tolist()) == [
        ["world-small", "model"],
        ["world_preference_pairs", "dataset"],
    ]

    assert "Reward model training" in read_artifact("reward-train")

    again = train_flow(params(world_models))
    assert again["model"]["version"] == model.version
    assert again["figures"]["reused earlier version"] is True
    assert len(sql("select * from models")) == 1


def test_ensemble_kind(prefect_api, world_models, data_dir):
    out = train_flow(params(world_models, kind="ensemble", members=2, model_name="my-ens"))
    model = read_model("my-ens")
    assert out["model"]["version"] == model.version
    scored = EnsembleRewardModel(model.path).score(["copy ab ="], ["ab"])
    assert len(scored["members"][0]) == 2 and scored["variance"][0] >= 0
    assert 0 <= out["figures"]["eval pairwise accuracy (ensemble mean)"] <= 1


def test_bad_rows_are_counted_and_kept_out(prefect_api, world_models, data_dir):
    good = [{"prompt": f"copy {c}b =", "chosen": f"{c}b", "rejected": f"b{c}"} for c in "acdefg"]
    bad = [
        {"prompt": "copy ab =", "chosen": "ab", "rejected": "ab"},
        {"prompt": "copy ab =", "chosen": "", "rejected": "ba"},
    ]
    write_dataset("pairs", (good * 5) + bad * 3)
    out = train_flow(params(world_models, dataset="pairs", eval_fraction=0.2))
    figures = out["figures"]
    dropped = sum(v for k, v in figures.items() if "dropped" in k)
    assert dropped == 6
    assert figures["train pairs"] + figures["eval pairs"] == 30


def test_bad_input_fails_before_training(prefect_api, world_models, data_dir):
    write_dataset("no_rejected", [{"prompt": "p", "chosen": "a"}])
    with pytest.raises(PreferenceDataError, match=r"\['rejected'\] missing"):
        train_flow(params(world_models, dataset="no_rejected"))
    write_dataset("all_same", [{"prompt": "p", "chosen": "a", "rejected": "a"}] * 20)
    with pytest.raises(PreferenceDataError, match="no usable pairs"):
        train_flow(params(world_models, dataset="all_same"))
    with pytest.raises(FileNotFoundError, match="base_model: no model folder"):
        train_flow(params(world_models, base_model=str(world_models / "missing")))
    with pytest.raises(ValueError, match="invalid model name"):
        RewardTrainParams(model_name="My Model")
    assert not (data_dir / "_models").exists() or not any((data_dir / "_models").iterdir())
