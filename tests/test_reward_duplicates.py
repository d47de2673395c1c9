"""Copies of a preference pair: counted, kept on one side of the held-out split, reported
for an explicit eval dataset, and refused when a dataset is one pair over and over."""

from __future__ import annotations

import logging
import random
from pathlib import Path

import pytest

from flywheel.flows.align import GroupRobustParams
from flywheel.flows.reward import RewardTrainParams, copies_of_train, split_pairs, train_flow
from flywheel.reward_models.bradley_terry import PreferenceDataError, clean_preferences, pair_key
from flywheel.store import read_dataset, read_model, write_dataset


def pair(i: int, **extra) -> dict:
    return {"prompt": f"copy {i} =", "chosen": f"{i}", "rejected": f"{i}x", **extra}


def with_copies(distinct: int, seed: int = 1) -> list[dict]:
    """`distinct` pairs, pair i repeated 1 + i % 4 times, in a shuffled order."""
    rows = [pair(i) for i in range(distinct) for _ in range(1 + i % 4)]
    random.Random(seed).shuffle(rows)
    return rows


def split(rows: list[dict], params=None, name: str = "pairs") -> tuple[list, list]:
    ref = write_dataset(name, rows)
    return split_pairs(params or RewardTrainParams(eval_fraction=0.2), [ref], rows)


def test_copies_stay_on_one_side_of_a_seeded_split(data_dir):
    rows = with_copies(40)
    train, held = split(rows)
    train_keys, held_keys = {pair_key(r) for r in train}, {pair_key(r) for r in held}
    assert not train_keys & held_keys
    assert len(train) + len(held) == len(rows)
    assert len(held_keys) == round(40 * 0.2)  # the fraction counts distinct pairs
    for key in held_keys:  # every copy of a held-out pair is held out
        assert sum(pair_key(r) == key for r in held) == sum(pair_key(r) == key for r in rows)

    again = split_pairs(RewardTrainParams(eval_fraction=0.2), [read_dataset("pairs")], rows)
    assert again == (train, held)
    other = split_pairs(RewardTrainParams(eval_fraction=0.2, seed=1), [read_dataset("pairs")], rows)
    assert {pair_key(r) for r in other[1]} != held_keys


def test_groups_do_not_make_copies_distinct(data_dir):
    # the same pair under two groups, and identical rows with their group, in many copies
    rows = [pair(i, group=g) for i in range(30) for g in ("plain", "spaced", "plain")]
    random.Random(0).shuffle(rows)
    params = GroupRobustParams(base_model=str(data_dir), eval_fraction=0.2)
    train, held = split(rows, params)
    assert not {pair_key(r) for r in train} & {pair_key(r) for r in held}
    assert len(held) == 3 * round(30 * 0.2)
    assert sorted(r["group"] for r in held).count("plain") == 2 * round(30 * 0.2)


def test_one_pair_over_and_over_is_refused(data_dir):
    with pytest.raises(PreferenceDataError, match=r"all 50 row\(s\) are copies of one pair"):
        split([pair(7)] * 50)
    with pytest.raises(PreferenceDataError, match=r"2 distinct pair\(s\) leave nothing"):
        split([pair(1), pair(2), pair(2)], RewardTrainParams(eval_fraction=0.9))


def test_an_explicit_eval_dataset_is_kept_whole_and_its_copies_counted(data_dir):
    rows = with_copies(10)
    train_ref = write_dataset("pairs", rows)
    eval_rows = [pair(3), pair(100), pair(3), pair(8), pair(101)]
    eval_ref = write_dataset("held", eval_rows)
    train, held = split_pairs(RewardTrainParams(eval_dataset="held"), [train_ref, eval_ref], rows)
    assert train == rows and held == eval_rows
    assert copies_of_train(train, held) == {"count": 3, "example_row": 0, "example": pair(3)}
    assert copies_of_train(train, [pair(100)]) == {"count": 0}


def test_clean_preferences_counts_copies_with_an_example(caplog):
    rows = [pair(1), pair(2), pair(1), {**pair(3), "rejected": "3"}, pair(2), pair(1)]
    with caplog.at_level(logging.WARNING):
        kept, report = clean_preferences(rows, "pairs")
    assert len(kept) == 5 and report["distinct"] == 2
    assert report["duplicates"] == {"count": 3, "pairs": 2, "example_row": 2, "example": pair(1)}
    assert "3 row(s) are copies of an earlier pair" in caplog.text
    assert clean_preferences([pair(1), pair(2)], "pairs")[1]["duplicates"] == {
        "count": 0,
        "pairs": 0,
    }


def read_artifact(key: str) -> str:
    """The newest artifact with `key` (earlier tests in the session wrote some too)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from prefect.client.schemas.sorting import ArtifactSort

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])),
            sort=ArtifactSort.CREATED_DESC,
            limit=1,
        )
    return found[0].data


def params(world_models: Path, **kw) -> RewardTrainParams:
    defaults = dict(base_model=str(world_models / "world-small"), epochs=1.0, batch_size=16)
    return RewardTrainParams(**{**defaults, **kw})


def test_reward_train_refuses_a_dataset_of_one_pair(prefect_api, world_models, data_dir):
    write_dataset("same_pair", [pair(7)] * 50)
    with pytest.raises(PreferenceDataError, match=r"all 50 row\(s\) are copies of one pair"):
        train_flow(params(world_models, dataset="same_pair"))
    # one usable pair among rows that are kept out is refused as well
    write_dataset("one_usable", [pair(7)] * 20 + [{**pair(8), "chosen": ""}] * 5)
    with pytest.raises(PreferenceDataError, match=r"\(usable rows\): all 20 row\(s\)"):
        train_flow(params(world_models, dataset="one_usable"))
    assert not (data_dir / "_models").exists() or not any((data_dir / "_models").iterdir())


def test_reward_train_reports_copies_and_holds_none_out(prefect_api, world_models, data_dir):
    rows = with_copies(24)
    write_dataset("pairs", rows)
    out = train_flow(params(world_models, dataset="pairs", eval_fraction=0.25))
    figures = out["figures"]
    assert figures["train pairs"] + figures["eval pairs"] == len(rows)
    assert figures["train duplicate rows"] + figures["eval duplicate rows"] == len(rows) - 24
    assert figures["eval rows copying a train pair"] == 0
    metrics = read_model(out["model"]["name"], out["model"]["version"]).meta["metrics"]
    assert metrics["eval_rows"]["distinct"] == round(24 * 0.25)
    artifact = read_artifact("reward-train")
    assert "| eval rows copying a train pair | 0 |" in artifact
    assert "## Duplicate pairs" in artifact and "are copies of an earlier pair" in artifact


def test_reward_train_counts_eval_rows_that_copy_training_pairs(
    prefect_api, world_models, data_dir, caplog
):
    write_dataset("pairs", with_copies(20))
    eval_rows = [pair(2), pair(200), pair(201), pair(5), pair(5), pair(202)]
    write_dataset("held", eval_rows)
    with caplog.at_level(logging.WARNING, logger="flywheel.flows.reward"):
        out = train_flow(params(world_models, dataset="pairs", eval_dataset="held"))
    figures = out["figures"]
    assert figures["eval pairs"] == len(eval_rows)  # the copies are evaluated, not dropped
    assert figures["eval rows copying a train pair"] == 3
    assert figures["eval duplicate rows"] == 1
    assert "3 of 6 usable row(s) are copies of training pairs" in caplog.text
    artifact = read_artifact("reward-train")
    assert "| eval rows copying a train pair | 3 |" in artifact
    assert "3 row(s) are copies of a training pair, e.g. row 0" in artifact
