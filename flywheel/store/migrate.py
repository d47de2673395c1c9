"""`flywheel store migrate`: a store written before the lake (version folders
``<root>/<name>/<version>/part-*.parquet`` + ``_meta.json``, catalog ``flywheel.duckdb``)
moved into the lake, keeping every version's name, rows, meta and lineage.

Idempotent: a version already in the lake is left as it is, so a migration stopped
halfway is finished by running it again. Each version moves in one transaction. The old
folders are left where they are (the report says so); the old catalog's runs were
copied into the lake when it was made, and model folders are registered as before.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from flywheel.store import catalog, publish
from flywheel.store.datasets import old_version_folders
from flywheel.store.naming import META_FILE, RESERVED_NAMES, DatasetVersionExists, data_root


@dataclass
class MigrationReport:
    moved: list[str] = field(default_factory=list)  # "name@version"
    already_there: list[str] = field(default_factory=list)
    refused: dict[str, str] = field(default_factory=dict)  # "name@version" -> why
    old_folders: list[Path] = field(default_factory=list)

    def lines(self) -> list[str]:
        out = [
            f"moved into the lake: {len(self.moved)} version(s)",
            f"already in the lake: {len(self.already_there)} version(s)",
        ]
        out += [f"not moved: {version}: {why}" for version, why in self.refused.items()]
        if self.old_folders:
            out.append(
                f"the old version folders ({len(self.old_folders)}) are left in place; "
                "once you have checked the lake, remove them by hand"
            )
        return out


def _old_rows(folder: Path) -> pa.Table:
    parts = sorted(folder.glob("part-*.parquet"))
    if not parts:
        raise ValueError(f"no part-*.parquet files in {folder}")
    return pa.concat_tables([pq.read_table(p) for p in parts])


def migrate(root: Path | None = None) -> MigrationReport:
    """Move every version folder of the old layout under `root` into the lake."""
    base = data_root(root)
    report = MigrationReport(old_folders=old_version_folders(base))
    publish.refresh_catalog(base)  # the lake (with the old runs) and the model folders
    in_lake = catalog.dataset_versions(base)  # a version moved in meanwhile: `exists` below
    for folder in report.old_folders:
        name, version = folder.parent.name, folder.name
        label = f"{name}@{version}"
        if name in RESERVED_NAMES:
            report.refused[label] = f"{name!r} is now a name of the catalog's own; rename it"
            continue
        if version in in_lake.get(name, ()):
            report.already_there.append(label)
            continue
        try:
            meta = json.loads((folder / META_FILE).read_text())
            rows = _old_rows(folder)
        except (OSError, ValueError, pa.ArrowException) as err:
            report.refused[label] = f"cannot read {folder}: {err}"
            continue
        meta |= {"name": name, "version": version, "num_rows": rows.num_rows}
        meta.setdefault("columns", {f.name: str(f.type) for f in rows.schema})
        meta.setdefault("inputs", [])
        meta.setdefault("created", datetime.fromtimestamp(folder.stat().st_mtime, UTC).isoformat())
        try:
            publish.publish_dataset(rows, meta, DatasetVersionExists(label), base)
        except DatasetVersionExists:  # another migration moved it in meanwhile
            report.already_there.append(label)
            continue
        report.moved.append(label)
    return report
