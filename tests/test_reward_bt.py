"""Bradley-Terry reward model through TRL's RewardTrainer on world preference pairs."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from flywheel.reward_models.bradley_terry import (
    PreferenceDataError,
    RewardModel,
    RewardTrainingConfig,
    clean_preferences,
    train_reward_model,
)


def world_pairs(n: int, seed: int) -> list[dict]:
    from flywheel.world.tasks import answer_preference_pairs

    return answer_preference_pairs(n, random.Random(seed))


def test_bad_pairs_are_reported_and_kept_out() -> None:
    rows = [
        {"prompt": "copy ab=", "chosen": "ab", "rejected": "ba"},
        {"prompt": "copy ab=", "chosen": "ab", "rejected": "ab"},
        {"prompt": "copy ab=", "chosen": "", "rejected": "ba"},
        {"prompt": "copy ab=", "chosen": 3, "rejected": "ba"},
    ]
    kept, report = clean_preferences(rows, "pairs")
    assert kept == rows[:1]
    assert {k: v["count"] for k, v in report["dropped"].items()} == {
        "chosen identical to rejected": 1,
        "empty text": 1,
        "non-text value": 1,
    }
    assert report["dropped"]["empty text"]["example_row"] == 2
    with pytest.raises(PreferenceDataError, match=r"\['rejected'\] missing"):
        clean_preferences([{"prompt": "p", "chosen": "c"}], "pairs")


def test_reward_model_learns_world_preferences_and_reloads(world_models, tmp_path) -> None:
    config = RewardTrainingConfig(base_model=str(world_models / "world-small"), epochs=2)
    train = world_pairs(1500, seed=0) + [{"prompt": "p", "chosen": "x", "rejected": "x"}]
    report = train_reward_model(train, world_pairs(300, seed=1), config, tmp_path / "rm")
    assert report["train_rows"]["dropped"]["chosen identical to rejected"]["count"] == 1
    # held-out pairs: clearly better than chance after a few seconds on the CPU
    assert report["eval_pairwise_accuracy"] > 0.6
    rm = RewardModel(tmp_path / "rm")
    held_out = world_pairs(200, seed=2)
    chosen = rm.score([r["prompt"] for r in held_out], [r["chosen"] for r in held_out])
    rejected = rm.score([r["prompt"] for r in held_out], [r["rejected"] for r in held_out])
    accuracy = sum(c > r for c, r in zip(chosen, rejected, strict=True)) / len(held_out)
    assert accuracy > 0.6
    with pytest.raises(FileNotFoundError, match="not a Flywheel reward model"):
        RewardModel(world_models / "world-small")


def test_margin_column_is_used(world_models, tmp_path) -> None:
    rows = [dict(r, margin=1.0) for r in world_pairs(200, seed=3)]
    config = RewardTrainingConfig(base_model=str(world_models / "world-small"), epochs=1)
    report = train_reward_model(rows, world_pairs(50, seed=4), config, tmp_path / "rm")
    assert Path(tmp_path / "rm" / "reward_stats.json").exists()
    assert report["train_rows"]["kept"] == 200
