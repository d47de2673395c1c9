"""Shared-backbone reward ensembles: trained in one run, scored with mean and variance."""

from __future__ import annotations

import pytest

from flywheel.reward_models.ensemble import EnsembleConfig, EnsembleRewardModel, train_ensemble
from tests.test_reward_bt import world_pairs


def test_ensemble_trains_members_that_agree_on_average_and_differ(world_models, tmp_path):
    config = EnsembleConfig(base_model=str(world_models / "world-small"), members=3, epochs=2)
    figures = train_ensemble(world_pairs(1500, 0), world_pairs(300, 1), config, tmp_path / "ens")
    accuracy = figures["eval_pairwise_accuracy"]
    assert len(accuracy["members"]) == 3 and accuracy["pairs"] == 300
    assert figures["trained_pairs"] == 1500 and figures["length"]["train"]["truncated"] == 0
    assert accuracy["mean"] > 0.6 and min(accuracy["members"]) > 0.55

    ensemble = EnsembleRewardModel(tmp_path / "ens")
    pairs = world_pairs(100, 2)
    scores = ensemble.score([r["prompt"] for r in pairs], [r["chosen"] for r in pairs])
    assert len(scores["members"]) == 100 and all(len(m) == 3 for m in scores["members"])
    assert all(v >= 0 for v in scores["variance"])
    # members are different functions: their rewards are not all identical
    assert sum(scores["variance"]) > 0
    for row, mean in zip(scores["members"], scores["mean"], strict=True):
        assert mean == pytest.approx(sum(row) / 3, abs=1e-5)
    with pytest.raises(FileNotFoundError, match="not a Flywheel reward ensemble"):
        EnsembleRewardModel(world_models / "world-small")
