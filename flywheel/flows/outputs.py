"""A checkpointed run's output datasets, each version planned once in the checkpoint
(the first writer wins): a resumed, repeated or concurrent run with the same inputs
reuses those versions instead of writing the same rows again."""

from __future__ import annotations

from collections.abc import Mapping

import pyarrow as pa

from flywheel.flows.tracking import write_once
from flywheel.store import Checkpoint, DatasetRef
from flywheel.store.datasets import new_version


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
