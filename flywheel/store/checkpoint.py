"""Chunked checkpoints: long work resumes after a kill without losing or repeating items.

Each chunk's results are written to their own JSON file (temporary name, then
an atomic rename) as soon as the chunk is done. A re-run with the same folder
skips the chunks that exist, so a killed run neither loses nor duplicates rows.
Each chunk is computed under a lock, so two runs of the same work at once (a
schedule and a manual run) compute it once: the second waits, then reads it.
"""

from __future__ import annotations

import contextvars
import hashlib
import json
import logging
import os
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any, TypeVar

from flywheel.store.locks import file_lock

log = logging.getLogger(__name__)
T = TypeVar("T")
R = TypeVar("R")


def _write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def in_threads(work: Callable[[T], R], jobs: Sequence[T], at_once: int) -> list[R]:
    """`work(job)` for each job, in order, with up to `at_once` running at a time on
    threads, each in a copy of the caller's context (which holds the run's model-call
    counts). After a failure no job starts; the ones running finish, then it is raised."""
    if at_once < 1:
        raise ValueError(f"at_once must be at least 1, got {at_once}")
    if at_once == 1 or len(jobs) < 2:
        return [work(job) for job in jobs]
    results: dict[int, R] = {}
    error: BaseException | None = None
    waiting = list(enumerate(jobs))[::-1]  # popped from the end: in order
    with ThreadPoolExecutor(at_once, thread_name_prefix="flywheel-chunk") as pool:
        running: dict[Future[R], int] = {}
        while running or (waiting and error is None):
            while waiting and error is None and len(running) < at_once:
                n, job = waiting.pop()
                running[pool.submit(contextvars.copy_context().run, work, job)] = n
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in finished:
                n = running.pop(future)
                try:
                    results[n] = future.result()
                except BaseException as err:  # the first is raised; the others are logged
                    if error is not None:
                        log.warning("also failed while stopping: %r", err)
                    error = error or err
    if error is not None:
        raise error
    return [results[n] for n in range(len(jobs))]


class Checkpoint:
    """A folder of stages; a stage is a list of result rows written chunk by chunk."""

    @staticmethod
    def key(*parts: Any) -> str:
        """A folder name for the work defined by `parts` (JSON-serialisable inputs)."""
        blob = json.dumps(parts, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:20]

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)

    def _stage_dir(self, stage: str) -> Path:
        return self.folder / stage

    def done(self, stage: str) -> bool:
        return (self._stage_dir(stage) / "_done.json").exists()

    def load(self, stage: str) -> list[dict]:
        """All rows of a finished stage, in item order."""
        if not self.done(stage):
            raise FileNotFoundError(f"stage {stage!r} has not finished in {self.folder}")
        rows: list[dict] = []
        for chunk in sorted(self._stage_dir(stage).glob("chunk-*.json")):
            rows.extend(json.loads(chunk.read_text()))
        return rows

    def map_chunks(
        self,
        stage: str,
        items: Sequence[Any],
        fn: Callable[[list[Any]], list[dict]],
        chunk_size: int = 64,
        at_once: int = 1,
    ) -> list[dict]:
        """Apply fn to items chunk by chunk (one result row per item), resuming past chunks.

        `at_once` chunks are worked on at a time, on threads, for a backend that takes
        calls from several threads (the HTTP one): the next chunk's requests go out while
        the last of this one's finish, so a chunk is the unit of checkpointing, not of
        concurrency. Each chunk is written as it finishes; when one fails, the others
        under way finish and are kept, no more start, and the error is raised."""
        if self.done(stage):
            return self.load(stage)
        folder = self._stage_dir(stage)
        folder.mkdir(parents=True, exist_ok=True)
        n_chunks = max(1, -(-len(items) // chunk_size))
        todo = [i for i in range(n_chunks) if not (folder / f"chunk-{i:06d}.json").exists()]

        def compute(i: int) -> bool:
            """Work out chunk i unless another run did meanwhile; whether this one did."""
            path = folder / f"chunk-{i:06d}.json"
            with file_lock(folder / f".chunk-{i:06d}.lock"):
                if path.exists():  # another run computed it while this one waited
                    return False
                chunk = list(items[i * chunk_size : (i + 1) * chunk_size])
                rows = fn(chunk) if chunk else []
                if len(rows) != len(chunk):
                    raise RuntimeError(f"{stage}: {len(rows)} results for {len(chunk)} items")
                _write_json_atomic(path, rows)
            log.info("%s: chunk %d of %d done (%d items)", stage, i + 1, n_chunks, len(chunk))
            return True

        computed = in_threads(compute, todo, at_once)
        if resumed := n_chunks - sum(computed):
            log.info("%s: resumed, %d of %d chunks were already done", stage, resumed, n_chunks)
        _write_json_atomic(folder / "_done.json", {"items": len(items), "chunks": n_chunks})
        return self.load(stage)

    def put_once(self, name: str, obj: Any) -> Any:
        """Store obj under name unless something is stored there already; return what is.

        Exclusive creation, so of two runs racing on the same folder, one wins."""
        path = self.folder / f"{name}.json"
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(obj))
        try:
            os.link(tmp, path)  # fails if path exists, atomically
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
        return json.loads(path.read_text())

    def put(self, name: str, obj: Any) -> None:
        _write_json_atomic(self.folder / f"{name}.json", obj)

    def get(self, name: str) -> Any | None:
        path = self.folder / f"{name}.json"
        return json.loads(path.read_text()) if path.exists() else None
