"""Chunked checkpoints: long work resumes after a kill without losing or repeating items.

Each chunk's results are written to their own JSON file (temporary name, then
an atomic rename) as soon as the chunk is done. A re-run with the same folder
skips the chunks that exist, so a killed run neither loses nor duplicates rows.
Each chunk is computed under a lock, so two runs of the same work at once (a
schedule and a manual run) compute it once: the second waits, then reads it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from flywheel.store.locks import file_lock

log = logging.getLogger(__name__)


def _write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


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
    ) -> list[dict]:
        """Apply fn to items chunk by chunk (one result row per item), resuming past chunks."""
        if self.done(stage):
            return self.load(stage)
        folder = self._stage_dir(stage)
        folder.mkdir(parents=True, exist_ok=True)
        n_chunks = max(1, -(-len(items) // chunk_size))
        resumed = 0
        for i in range(n_chunks):
            path = folder / f"chunk-{i:06d}.json"
            if path.exists():
                resumed += 1
                continue
            with file_lock(folder / f".chunk-{i:06d}.lock"):
                if path.exists():  # another run computed it while this one waited
                    resumed += 1
                    continue
                chunk = list(items[i * chunk_size : (i + 1) * chunk_size])
                rows = fn(chunk) if chunk else []
                if len(rows) != len(chunk):
                    raise RuntimeError(f"{stage}: {len(rows)} results for {len(chunk)} items")
                _write_json_atomic(path, rows)
            log.info(
                "%s: chunk %d/%d done (%d/%d items)",
                stage,
                i + 1,
                n_chunks,
                min((i + 1) * chunk_size, len(items)),
                len(items),
            )
        if resumed:
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
