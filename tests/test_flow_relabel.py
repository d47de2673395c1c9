"""`reward/relabel` under a real Prefect server: a UGDA round with the world oracle, the
human queue across two runs, and bad input."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from flywheel.flows.relabel import RelabelParams, relabel
from flywheel.flows.reward import RewardTrainParams, train_flow
from flywheel.reward_models.labelers import LabelFileError
from flywheel.store import list_model_versions, read_dataset, read_model, sql


def params(world_models: Path, **kw) -> RelabelParams:
    defaults = dict(
        ensemble="ens",
        policy={"model": str(world_models / "world-small")},
        n_prompts=80,
        n_validation_prompts=30,
        budget=8,
        uncertain_fraction=0.5,
        projection_dim=64,
        refine_epochs=1.0,
    )
    return RelabelParams(**{**defaults, **kw})


@pytest.fixture
def ensemble(prefect_api, world_models, data_dir):
    train_flow(
        RewardTrainParams(
            base_model=str(world_models / "world-small"),
            kind="ensemble",
            members=3,
            model_name="ens",
            world_pairs=200,
            epochs=1.0,
        )
    )
    return read_model("ens")


def test_world_oracle_round_refines_the_ensemble(ensemble, world_models):
    out = relabel(params(world_models))
    assert out["status"] == "refined"
    assert list_model_versions("ens")[-1] == out["model"]["version"] != ensemble.version
    candidates = read_dataset("relabel_candidates").to_pandas()
    assert candidates.selected.sum() == 8
    # UGDA: the selected pairs come from the most uncertain half
    cut = candidates.variance.quantile(0.5)
    assert (candidates[candidates.selected].variance >= cut - 1e-12).all()
    labeled = read_dataset("relabel_labeled")
    failed = read_dataset("relabel_labeled__failed")
    assert labeled.num_rows + failed.num_rows == 8
    lineage = sql(
        f"select input_dataset, input_kind from lineage where kind = 'model' "
        f"and version = '{out['model']['version']}' order by 1"
    ).values.tolist()
    assert ["ens", "model"] in lineage and ["relabel_labeled", "dataset"] in lineage
    # the next round starts from the refined version
    again = relabel(params(world_models))
    assert again["figures"]["ensemble"] == f"ens@{out['model']['version']}"
    assert list_model_versions("ens")[-1] == again["model"]["version"]


def test_human_queue_then_labels_file(ensemble, world_models, data_dir, tmp_path):
    first = relabel(params(world_models, labeler="human"))
    assert first["status"] == "queued"
    queue = read_dataset("relabel_queue")
    assert queue.num_rows == 8
    # no labels yet: the next run waits instead of queueing more
    assert relabel(params(world_models, labeler="human"))["status"] == "waiting"

    pairs = queue.to_pandas()
    bad = tmp_path / "bad.csv"
    pd.DataFrame({"id": ["not-in-queue"], "label": ["a"]}).to_csv(bad, index=False)
    with pytest.raises(LabelFileError, match="1 id\\(s\\) are not in queue relabel_queue"):
        relabel(params(world_models, labeler="human", labels_file=str(bad)))

    good = data_dir / "_labels" / "relabel_queue.csv"
    good.parent.mkdir(parents=True, exist_ok=True)
    labels = ["a", "b"] * (len(pairs) // 2)
    labels[-1] = ""  # partial labeling is allowed
    labels[-2] = "maybe"  # kept out and reported, not trained on
    pd.DataFrame({"id": pairs.id, "label": labels}).to_csv(good, index=False)
    done = relabel(params(world_models, labeler="human"))
    assert done["status"] == "refined"
    assert done["figures"]["queue pairs left unlabeled"] == 1
    assert done["figures"]["queue pairs kept out (label not a or b)"] == 1
    assert read_dataset("relabel_labeled").num_rows == len(pairs) - 2
    assert set(read_dataset("relabel_labeled").to_pandas().labeler) == {"human:relabel_queue.csv"}


def test_bad_input(ensemble, world_models, data_dir):
    with pytest.raises(ValueError, match="judge: required"):
        relabel(params(world_models, labeler="llm"))
    with pytest.raises(ValueError, match="budget: 500 is more than"):
        relabel(params(world_models, budget=500))
    train_flow(
        RewardTrainParams(
            base_model=str(world_models / "world-small"),
            model_name="single",
            world_pairs=100,
            epochs=1.0,
        )
    )
    with pytest.raises(ValueError, match="UGDA needs an ensemble"):
        relabel(params(world_models, ensemble="single"))
