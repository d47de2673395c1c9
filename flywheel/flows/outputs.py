"""Datasets a run writes at most once: generated inputs once per generator setting
(`reuse_or_write`), a planned version once (`write_once`), and a checkpointed run's
outputs, each version planned once in the checkpoint (`PlannedOutputs`; the first
writer wins): a resumed, repeated or concurrent run with the same inputs reuses those
versions instead of writing the same rows again."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import pyarrow as pa

from flywheel.store import (
    Checkpoint,
    DatasetRef,
    DatasetVersionExists,
    data_root,
    list_datasets,
    list_versions,
    read_dataset,
    write_dataset,
)
from flywheel.store.locks import file_lock
from flywheel.store.naming import new_version


def reuse_or_write(name: str, producer: str, make_rows: Callable[[], list[dict]]) -> DatasetRef:
    """The version of `name` that `producer` wrote before, or a new one from `make_rows()`:
    generated inputs (world tasks, world pairs) are written once per generator setting,
    also when two runs ask at once (the second waits for the first's version)."""
    with file_lock(data_root() / "_locks" / f"{name}.lock"):
        if name in list_datasets():
            for version in reversed(list_versions(name)):
                ref = read_dataset(name, version)
                if ref.meta.get("produced_by") == producer:
                    return ref
        return write_dataset(name, make_rows(), produced_by=producer)


def write_once(
    name: str,
    rows: list[dict],
    version: str,
    produced_by: str,
    inputs: list,
    schema: pa.Schema | None = None,
) -> tuple[DatasetRef, bool]:
    """Write a planned version, or take the one an earlier (killed or repeated) run wrote.
    Returns (ref, reused)."""
    try:
        ref = write_dataset(
            name, rows, produced_by=produced_by, inputs=inputs, version=version, schema=schema
        )
        return ref, False
    except DatasetVersionExists:
        return read_dataset(name, version), True


class PlannedOutputs:
    """The datasets `names` ({kind: dataset name}) of the run `run_id`, written through
    `write`; `reused` tells whether an earlier run had written any of them."""

    def __init__(self, ckpt: Checkpoint, names: Mapping[str, str], run_id: str) -> None:
        self.names = dict(names)
        self.versions = ckpt.put_once("versions", {kind: new_version() for kind in names})
        self.run_id = run_id
        self.reused = False

    def write(self, kind: str, rows: list[dict], inputs: list, schema: pa.Schema) -> DatasetRef:
        """The planned version of `kind`, written from `rows` or taken as written before."""
        name, version = self.names[kind], self.versions[kind]
        ref, reused = write_once(name, rows, version, self.run_id, inputs, schema)
        self.reused = self.reused or reused
        return ref
