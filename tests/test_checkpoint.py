"""Chunked checkpoints with several chunks under way at once: the same rows as one at a
time, chunks kept when another fails, and a resumed run computing only the rest."""

from __future__ import annotations

import threading
from contextvars import ContextVar

import pytest

from flywheel.store.checkpoint import Checkpoint, in_threads

ITEMS = list(range(23))  # 6 chunks of 4, the last one short


def doubled(chunk: list[int]) -> list[dict]:
    return [{"item": i, "double": 2 * i} for i in chunk]


def test_chunks_at_once_give_the_rows_of_one_at_a_time(tmp_path) -> None:
    together = threading.Barrier(3, timeout=60)  # passes only with 3 chunks under way
    first_three: list[int] = []

    def work(chunk: list[int]) -> list[dict]:
        if chunk[0] < 12:
            first_three.append(chunk[0])
            together.wait()
        return doubled(chunk)

    at_once = Checkpoint(tmp_path / "a").map_chunks("s", ITEMS, work, chunk_size=4, at_once=3)
    one_by_one = Checkpoint(tmp_path / "b").map_chunks("s", ITEMS, doubled, chunk_size=4)
    assert at_once == one_by_one == doubled(ITEMS)
    assert sorted(first_three) == [0, 4, 8]


def test_a_failed_chunk_keeps_the_ones_under_way_and_the_rerun_does_the_rest(tmp_path) -> None:
    failed = threading.Event()
    started: list[int] = []

    def work(chunk: list[int]) -> list[dict]:
        started.append(chunk[0])
        if chunk[0] == 4:
            failed.set()
            raise RuntimeError("server went away")
        assert failed.wait(60)  # chunk 0 finishes after chunk 1 failed
        return doubled(chunk)

    ckpt = Checkpoint(tmp_path)
    with pytest.raises(RuntimeError, match="server went away"):
        ckpt.map_chunks("s", ITEMS, work, chunk_size=4, at_once=2)
    assert sorted(started) == [0, 4]  # none started after the failure
    assert [p.name for p in sorted((tmp_path / "s").glob("chunk-*"))] == ["chunk-000000.json"]
    asked: list[int] = []

    def again(chunk: list[int]) -> list[dict]:
        asked.append(chunk[0])
        return doubled(chunk)

    assert ckpt.map_chunks("s", ITEMS, again, chunk_size=4, at_once=2) == doubled(ITEMS)
    assert sorted(asked) == [4, 8, 12, 16, 20]


def test_threads_run_in_the_callers_context() -> None:
    run: ContextVar[str] = ContextVar("run", default="none")
    run.set("this run")
    assert in_threads(lambda n: (n, run.get()), [1, 2, 3], at_once=2) == [
        (1, "this run"),
        (2, "this run"),
        (3, "this run"),
    ]
    with pytest.raises(ValueError, match="at_once must be at least 1"):
        in_threads(lambda n: n, [1], at_once=0)
