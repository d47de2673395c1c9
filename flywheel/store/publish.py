"""Everything that adds to the store, in one module: dataset versions, model versions,
runs, and the catalog's refresh. The other store modules only read.

A dataset version is written in one lake transaction (its table, ``versions`` row,
lineage rows and latest view), so readers never see half a version, and a version
never changes once it exists. A model version is built in a temporary folder, renamed
into place, then registered in the catalog (``models`` and ``lineage`` rows).
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa

from flywheel.store.catalog import ident, literal, naive_utc, utcnow, write
from flywheel.store.datasets import DatasetRef, check_text, list_versions, to_table
from flywheel.store.models import (
    MODEL_META,
    ModelRef,
    input_record,
    list_model_versions,
    list_models,
    models_dir,
    read_model,
    validate_model_name,
)
from flywheel.store.naming import (
    CatalogBusy,
    DatasetVersionExists,
    StoreError,
    data_root,
    new_version,
    validate_name,
    validate_version,
    version_table,
)

VIEW_COMMENT = "flywheel dataset"


def _create_latest_view(con: duckdb.DuckDBPyConnection, name: str) -> None:
    """The view `<name>`: its latest version. Made in the transaction that adds a version,
    so the last writer always leaves the true latest."""
    (latest,) = con.execute("SELECT max(version) FROM versions WHERE name = ?", [name]).fetchone()
    con.execute(
        f"CREATE OR REPLACE VIEW {ident(name)} AS "
        f"SELECT * FROM {ident(version_table(name, latest))}"
    )
    # The comment marks views that the store owns.
    con.execute(f"COMMENT ON VIEW {ident(name)} IS {literal(VIEW_COMMENT)}")


def _add_lineage(
    con: duckdb.DuckDBPyConnection, name: str, version: str, meta: dict[str, Any], kind: str
) -> None:
    """Lineage rows of one version from its meta, unless it already has some."""
    known = con.execute(
        "SELECT count(*) FROM lineage WHERE dataset = ? AND version = ? AND kind = ?",
        [name, version, kind],
    ).fetchone()
    if known and known[0]:
        return
    inputs = meta.get("inputs") or [{"name": None, "version": None, "kind": None}]
    now = utcnow()
    con.executemany(
        "INSERT INTO lineage (dataset, version, produced_by, input_dataset, input_version, "
        "recorded, kind, input_kind) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        [
            [
                name,
                version,
                meta.get("produced_by"),
                i["name"],
                i["version"],
                now,
                kind,
                i.get("kind", "dataset") if i["name"] else None,
            ]
            for i in inputs
        ],
    )


def publish_dataset(
    table: pa.Table, meta: dict[str, Any], exists: StoreError, root: Path | None = None
) -> None:
    """Add the version `meta["name"]`@`meta["version"]` with the rows `table`: its lake
    table, `versions` row, lineage rows and latest view, in one transaction (all or
    none). Raises `exists` when the version is there already."""
    name, version = meta["name"], meta["version"]
    rows = f"flywheel_rows_{uuid.uuid4().hex}"

    def publish(con: duckdb.DuckDBPyConnection) -> None:
        if con.execute(
            "SELECT 1 FROM versions WHERE name = ? AND version = ?", [name, version]
        ).fetchone():
            raise exists
        con.register(rows, table)
        try:
            con.execute(
                f"CREATE TABLE {ident(version_table(name, version))} AS SELECT * FROM {rows}"
            )
        finally:
            con.unregister(rows)
        con.execute(
            "INSERT INTO versions VALUES (?, ?, ?, ?, ?, ?, ?)",
            [
                name,
                version,
                naive_utc(datetime.fromisoformat(meta["created"])),
                meta.get("produced_by"),
                table.num_rows,
                json.dumps(meta, default=str),
                table.schema.serialize().to_pybytes(),
            ],
        )
        _add_lineage(con, name, version, meta, "dataset")
        _create_latest_view(con, name)

    write(root, publish)


def _add_model(con: duckdb.DuckDBPyConnection, ref: ModelRef) -> None:
    meta = ref.meta
    # DuckLake has no keys: a version already in `models` is left as it is
    con.execute(
        "INSERT INTO models SELECT ?, ?, ?, ?, ?, ?, ? WHERE NOT EXISTS "
        "(SELECT 1 FROM models WHERE name = ? AND version = ?)",
        [
            ref.name,
            ref.version,
            meta.get("kind"),
            ref.path,
            meta.get("produced_by"),
            json.dumps(meta.get("metrics"), default=str),
            naive_utc(datetime.fromisoformat(meta["created"])),
            ref.name,
            ref.version,
        ],
    )
    _add_lineage(con, ref.name, ref.version, meta, "model")


def register_model(ref: ModelRef, root: Path | None = None) -> None:
    """Add one new model version to the catalog (its `models` row and lineage rows)."""
    write(root, lambda con: _add_model(con, ref))


def refresh_catalog(root: Path | None = None) -> None:
    """Make the catalog if there is none, add the models and lineage rows of model
    folders not yet in it, and remake every dataset's latest view; safe to run any time."""
    base = data_root(root)

    def refresh(con: duckdb.DuckDBPyConnection) -> None:
        for name in list_models(base):
            for version in list_model_versions(name, base):
                _add_model(con, read_model(name, version, base))
        for (name,) in con.execute("SELECT DISTINCT name FROM versions").fetchall():
            _create_latest_view(con, name)

    write(base, refresh)


def record_run(
    run_id: str,
    flow: str,
    parameters: dict[str, Any],
    status: str,
    started: datetime | None = None,
    ended: datetime | None = None,
    root: Path | None = None,
    pid: int | None = None,
    host: str | None = None,
    model_calls: list[dict[str, Any]] | None = None,
) -> None:
    """Insert or update a flow run; times are stored as UTC, ``started`` defaults to now.
    ``pid`` and ``host`` name the process running it, ``model_calls`` what its backends
    sent (`flywheel.llm.usage`); each is kept when not given."""
    params = json.dumps(parameters, default=str, sort_keys=True)
    calls = None if model_calls is None else json.dumps(model_calls, sort_keys=True)
    started, ended = naive_utc(started), naive_utc(ended)

    def record(con: duckdb.DuckDBPyConnection) -> None:
        (updated,) = con.execute(
            "UPDATE runs SET flow = ?, parameters = ?, status = ?, "
            "started = coalesce(?, started), ended = coalesce(?, ended), "
            "pid = coalesce(?, pid), host = coalesce(?, host), "
            "model_calls = coalesce(?, model_calls) WHERE run_id = ?",
            [flow, params, status, started, ended, pid, host, calls, run_id],
        ).fetchone()
        if not updated:
            con.execute(
                "INSERT INTO runs (run_id, flow, parameters, started, ended, status, pid, host, "
                "model_calls) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [run_id, flow, params, started or utcnow(), ended, status, pid, host, calls],
            )

    write(root, record)


def set_run_status(
    run_id: str, status: str, ended: datetime | None, was: str, root: Path | None = None
) -> bool:
    """Set a run's status and end time, only if its status is still ``was`` (a run
    that recorded its own end meanwhile keeps it). Returns whether the row changed."""

    def update(con: duckdb.DuckDBPyConnection) -> bool:
        (changed,) = con.execute(
            "UPDATE runs SET status = ?, ended = coalesce(?, ended) "
            "WHERE run_id = ? AND status = ?",
            [status, naive_utc(ended), run_id, was],
        ).fetchone()
        return bool(changed)

    return write(root, update)


def write_dataset(
    name: str,
    rows: Iterable[dict[str, Any]] | pa.Table | Any,
    *,
    produced_by: str | None = None,
    inputs: Sequence[Any] = (),
    version: str | None = None,
    root: Path | None = None,
    schema: pa.Schema | None = None,
) -> DatasetRef:
    """Write a new immutable version of a dataset and register it in the catalog.

    ``rows`` is an iterable of dicts, a pyarrow Table or a pandas DataFrame.
    """
    validate_name(name)
    version = new_version() if version is None else validate_version(version)
    base = data_root(root)
    exists = DatasetVersionExists(f"{name} version {version} already exists in {base}")
    if version in list_versions(name, root=base):  # before converting rows never written
        raise exists

    table = to_table(rows, schema)
    if table.num_columns == 0:
        raise ValueError("rows have no columns: pass schema= so the dataset knows its columns")
    check_text(table)
    meta = {
        "name": name,
        "version": version,
        "created": datetime.now(UTC).isoformat(),
        "produced_by": produced_by,
        # DatasetRefs or ModelRefs (models record their kind)
        "inputs": [input_record(r) for r in inputs],
        "num_rows": table.num_rows,
        "columns": {f.name: str(f.type) for f in table.schema},
    }
    publish_dataset(table, meta, exists, base)
    return DatasetRef(name=name, version=version, root=str(base))


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish_version(
    target: Path, build: Callable[[Path], dict[str, Any]], *, meta_file: str, exists: StoreError
) -> None:
    """Publish the version folder ``target`` whole or not at all.

    ``build(tmp)`` fills a fresh temporary folder beside ``target`` and returns the meta
    written as ``meta_file``; the folder is then synced and renamed into place. On any
    failure the temporary folder is removed. ``exists`` is raised when another writer
    published ``target`` first.
    """
    folder = target.parent
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".tmp-{uuid.uuid4().hex}"
    tmp.mkdir()
    try:
        meta = build(tmp)
        with open(tmp / meta_file, "w") as f:
            json.dump(meta, f, indent=2, default=str)
            f.flush()
            os.fsync(f.fileno())
        _fsync(tmp)
        try:
            os.rename(tmp, target)
        except OSError as e:
            if target.exists():
                raise exists from e
            raise
        _fsync(folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save_model_version(
    name: str,
    build: Callable[[Path], dict[str, Any]],
    *,
    kind: str,
    produced_by: str | None = None,
    inputs: Sequence[DatasetRef | ModelRef] = (),
    version: str | None = None,
    root: Path | None = None,
) -> ModelRef:
    """Build a model into a fresh folder, then publish it as a new version.

    ``build(folder)`` writes the model files and returns its metrics (JSON-able);
    if it raises, nothing is published.
    """
    validate_model_name(name)
    # validated like a dataset version: it names a folder under the model's folder
    version = new_version() if version is None else validate_version(version, "model")
    target = models_dir(root) / name / version
    exists = StoreError(f"model {name} version {version} already exists at {target}")
    if target.exists():
        raise exists

    def build_with_meta(tmp: Path) -> dict[str, Any]:
        metrics = build(tmp)
        return {
            "name": name,
            "version": version,
            "kind": kind,
            "created": datetime.now(UTC).isoformat(),
            "produced_by": produced_by,
            "inputs": [input_record(r) for r in inputs],
            "metrics": metrics,
        }

    publish_version(target, build_with_meta, meta_file=MODEL_META, exists=exists)
    ref = ModelRef(name=name, version=version, path=str(target))
    try:
        register_model(ref, root=root)
    except CatalogBusy as e:
        raise CatalogBusy(
            f"{e}; the model itself is safely written at {ref.path} and the next "
            "refresh_catalog() registers it"
        ) from e
    return ref
