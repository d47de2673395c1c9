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
    pair_key,
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


def test_chat_messages_are_text_values_and_malformed_ones_are_reported(tmp_path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    question = [{"role": "user", "content": "copy ab="}]
    answer = [{"role": "assistant", "content": "ab"}]
    good = {"prompt": question, "chosen": answer, "rejected": "ba"}
    # read back from parquet, messages are numpy arrays of dicts
    pq.write_table(pa.Table.from_pylist([good]), tmp_path / "pairs.parquet")
    (from_parquet,) = pq.read_table(tmp_path / "pairs.parquet").to_pandas().to_dict("records")
    assert not isinstance(from_parquet["prompt"], list)
    rows = [
        good,
        from_parquet,
        {"prompt": None, "chosen": "ab", "rejected": "ba"},
        {"prompt": [{"role": "user", "content": "  "}], "chosen": "ab", "rejected": "ba"},
        {"prompt": [], "chosen": "ab", "rejected": "ba"},
        {"prompt": [{"role": "robot", "content": "x"}], "chosen": "ab", "rejected": "ba"},
        {"prompt": question, "chosen": [{"role": "user", "content": "ab"}], "rejected": "ba"},
        {"prompt": question, "chosen": answer, "rejected": "ab"},  # says the same as chosen
    ]
    kept, report = clean_preferences(rows, "pairs")
    assert kept == [good, good]  # normalized: the parquet copy holds lists of dicts
    assert isinstance(kept[1]["prompt"], list) and isinstance(kept[1]["chosen"], list)
    assert {k: v["count"] for k, v in report["dropped"].items()} == {
        "non-text value": 1,
        "empty text": 2,
        "malformed chat messages": 1,
        "answer messages without an assistant turn": 1,
        "chosen identical to rejected": 1,
    }
    assert "robot" in report["dropped"]["malformed chat messages"]["error"]
    assert report["dropped"]["non-text value"]["example_row"] == 2
    # the parquet copy is the same pair as the list one
    assert pair_key(from_parquet) == pair_key(good) != pair_key({**good, "rejected": "b"})
    assert report["duplicates"]["count"] == 1


def test_reward_model_learns_world_preferences_and_reloads(world_models, tmp_path) -> None:
    config = RewardTrainingConfig(base_model=str(world_models / "world-small"), epochs=2)
    train = world_pairs(1500, seed=0) + [{"prompt": "p", "chosen": "x", "rejected": "x"}]
    report = train_reward_model(train, world_pairs(300, seed=1), config, tmp_path / "rm")
    assert report["train_rows"]["dropped"]["chosen identical to rejected"]["count"] == 1
    assert report["trained_pairs"] == report["train_rows"]["kept"] == 1500
    assert report["eval_pairs"] == 300 and report["prompt_format"] == "raw"
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
