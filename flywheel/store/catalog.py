"""The DuckDB catalog ``<root>/flywheel.duckdb``: dataset views, ``runs``, ``models``, ``lineage``.

DuckDB lets one process at a time open the file read-write, and such a
connection blocks every other process, readers included. So every access goes
through ``_connect``: a short-lived connection, retried with backoff while
another process holds the lock, closed as soon as the work is done.
"""

from __future__ import annotations

import json
import random
import re
import threading
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import duckdb
import pandas as pd

from flywheel.store.datasets import (
    CatalogBusy,
    DatasetRef,
    data_root,
    list_datasets,
    list_versions,
    read_dataset,
)
from flywheel.store.locks import file_lock
from flywheel.store.models import ModelRef, list_model_versions, list_models, read_model

CATALOG_FILE = "flywheel.duckdb"
LOCK_TIMEOUT_S = 60.0
VIEW_COMMENT = "flywheel dataset"

# Threads of one process share DuckDB's file lock, so serialize them here instead.
_thread_lock = threading.RLock()

_TABLES = """
CREATE TABLE IF NOT EXISTS runs (
    run_id VARCHAR PRIMARY KEY,
    flow VARCHAR,
    parameters VARCHAR,
    started TIMESTAMP,
    ended TIMESTAMP,
    status VARCHAR
);
-- the process that ran it, so a run whose process died can be marked crashed
ALTER TABLE runs ADD COLUMN IF NOT EXISTS pid INTEGER;
ALTER TABLE runs ADD COLUMN IF NOT EXISTS host VARCHAR;
CREATE TABLE IF NOT EXISTS lineage (
    dataset VARCHAR,
    version VARCHAR,
    produced_by VARCHAR,
    input_dataset VARCHAR,
    input_version VARCHAR,
    recorded TIMESTAMP
);
-- `dataset`/`input_dataset` name a dataset or, where the kind says so, a model.
ALTER TABLE lineage ADD COLUMN IF NOT EXISTS kind VARCHAR DEFAULT 'dataset';
ALTER TABLE lineage ADD COLUMN IF NOT EXISTS input_kind VARCHAR DEFAULT 'dataset';
CREATE TABLE IF NOT EXISTS models (
    name VARCHAR,
    version VARCHAR,
    kind VARCHAR,
    path VARCHAR,
    produced_by VARCHAR,
    metrics VARCHAR,
    created TIMESTAMP,
    PRIMARY KEY (name, version)
);
"""


def catalog_path(root: Path | None = None) -> Path:
    """Path of the catalog file."""
    return data_root(root) / CATALOG_FILE


def _is_lock_error(e: duckdb.Error) -> bool:
    text = str(e)
    return "Could not set lock" in text or "Conflicting lock" in text


# A read-only connection never installs or downloads extensions, and a statement cannot
# change its settings (lock_configuration is applied after the other options).
READ_ONLY_CONFIG: dict[str, Any] = {
    "autoinstall_known_extensions": False,
    "autoload_known_extensions": False,
    "lock_configuration": True,
}


@contextmanager
def _connect(
    root: Path | None = None, *, read_only: bool = False
) -> Iterator[duckdb.DuckDBPyConnection]:
    """A short-lived connection to the catalog, waiting out other processes.

    A read-only connection waits too: it conflicts with a writer like any other.
    """
    path = catalog_path(root)
    path.parent.mkdir(parents=True, exist_ok=True)
    config = READ_ONLY_CONFIG if read_only else {}
    with _thread_lock:
        deadline = time.monotonic() + LOCK_TIMEOUT_S
        delay = 0.02
        while True:
            try:
                # DuckDB writes a new file's header while it opens it: of two processes
                # creating the catalog at once, one saw a half-written file ("not a valid
                # DuckDB database file"), so opens of the project's own processes take turns
                with file_lock(path.with_name(f".{path.name}.open.lock"), log_wait=False):
                    con = duckdb.connect(str(path), read_only=read_only, config=config)
                break
            except duckdb.IOException as e:
                remaining = deadline - time.monotonic()
                if not _is_lock_error(e):
                    raise
                if remaining <= 0:
                    raise CatalogBusy(
                        f"the catalog {path} stayed locked by another process for "
                        f"{LOCK_TIMEOUT_S:.0f}s. Any DuckDB process with the file open blocks "
                        "flows, even one opened with -readonly: close it, and use "
                        "`flywheel shell` (a snapshot copy) or `flywheel sql` (short "
                        f"read-only queries) instead: {e}"
                    ) from e
                time.sleep(min(remaining, delay * random.uniform(0.5, 1.5)))
                delay = min(delay * 2, 2.0)
        try:
            yield con
        finally:
            con.close()


def connect_read_only(
    root: Path | None = None,
) -> AbstractContextManager[duckdb.DuckDBPyConnection]:
    """A short-lived read-only connection to the catalog, with the same wait on the lock.

    While it is open no process can write the catalog, so the file can be copied whole.
    """
    return _connect(root, read_only=True)


def _utcnow() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


def _naive_utc(dt: datetime | None) -> datetime | None:
    if dt is None or dt.tzinfo is None:
        return dt
    return dt.astimezone(UTC).replace(tzinfo=None)


def _ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _create_view(con: duckdb.DuckDBPyConnection, view: str, ref: DatasetRef) -> None:
    files = ", ".join(_literal(f) for f in ref.files())
    con.execute(f"CREATE OR REPLACE VIEW {_ident(view)} AS SELECT * FROM read_parquet([{files}])")
    # The comment marks views that refresh_catalog owns (and may drop when stale).
    con.execute(f"COMMENT ON VIEW {_ident(view)} IS {_literal(VIEW_COMMENT)}")


def _create_latest_view(con: duckdb.DuckDBPyConnection, name: str, base: Path) -> None:
    # Called while holding the lock, so the last writer always leaves the true latest.
    _create_view(con, name, read_dataset(name, root=base))


def _add_lineage(con: duckdb.DuckDBPyConnection, ref: DatasetRef | ModelRef) -> None:
    """Lineage rows of one version from its meta file, unless it already has some."""
    kind = "model" if isinstance(ref, ModelRef) else "dataset"
    known = con.execute(
        "SELECT count(*) FROM lineage WHERE dataset = ? AND version = ? AND kind = ?",
        [ref.name, ref.version, kind],
    ).fetchone()
    if known and known[0]:
        return
    meta = ref.meta
    inputs = meta.get("inputs") or [{"name": None, "version": None, "kind": None}]
    now = _utcnow()
    con.executemany(
        "INSERT INTO lineage (dataset, version, produced_by, input_dataset, input_version, "
        "recorded, kind, input_kind) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        [
            [
                ref.name,
                ref.version,
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


def _add_model(con: duckdb.DuckDBPyConnection, ref: ModelRef) -> None:
    meta = ref.meta
    con.execute(
        "INSERT OR IGNORE INTO models VALUES (?, ?, ?, ?, ?, ?, ?)",
        [
            ref.name,
            ref.version,
            meta.get("kind"),
            ref.path,
            meta.get("produced_by"),
            json.dumps(meta.get("metrics"), default=str),
            _naive_utc(datetime.fromisoformat(meta["created"])),
        ],
    )
    _add_lineage(con, ref)


def register_model(ref: ModelRef, root: Path | None = None) -> None:
    """Add one new model version to the catalog (its `models` row and lineage rows)."""
    with _connect(data_root(root)) as con:
        con.begin()
        con.execute(_TABLES)
        _add_model(con, ref)
        con.commit()


def register_version(ref: DatasetRef, root: Path | None = None) -> None:
    """Add one new version to the catalog (its views and lineage rows)."""
    base = data_root(root)
    with _connect(base) as con:
        con.begin()
        con.execute(_TABLES)
        _create_view(con, f"{ref.name}__{ref.version}", ref)
        _create_latest_view(con, ref.name, base)
        _add_lineage(con, ref)
        con.commit()


def refresh_catalog(root: Path | None = None) -> None:
    """Rebuild every dataset view, add missing model and lineage rows; safe to run any time."""
    base = data_root(root)
    with _connect(base) as con:
        con.begin()
        con.execute(_TABLES)
        wanted: set[str] = set()
        for name in list_datasets(base):
            for version in list_versions(name, root=base):
                ref = read_dataset(name, version, root=base)
                _create_view(con, f"{name}__{version}", ref)
                _add_lineage(con, ref)
                wanted.add(f"{name}__{version}")
            _create_latest_view(con, name, base)
            wanted.add(name)
        for name in list_models(base):
            for version in list_model_versions(name, base):
                _add_model(con, read_model(name, version, base))
        stale = con.execute(
            "SELECT view_name FROM duckdb_views() WHERE NOT internal AND comment = ?",
            [VIEW_COMMENT],
        ).fetchall()
        for (view,) in stale:
            if view not in wanted:
                con.execute(f"DROP VIEW IF EXISTS {_ident(view)}")
        con.commit()


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
) -> None:
    """Insert or update a flow run; times are stored as UTC, ``started`` defaults to now.
    ``pid`` and ``host`` name the process running it (kept when not given)."""
    params = json.dumps(parameters, default=str, sort_keys=True)
    started, ended = _naive_utc(started), _naive_utc(ended)
    with _connect(root) as con:
        con.begin()
        con.execute(_TABLES)
        exists = con.execute("SELECT 1 FROM runs WHERE run_id = ?", [run_id]).fetchone()
        if exists:
            con.execute(
                "UPDATE runs SET flow = ?, parameters = ?, status = ?, "
                "started = coalesce(?, started), ended = coalesce(?, ended), "
                "pid = coalesce(?, pid), host = coalesce(?, host) WHERE run_id = ?",
                [flow, params, status, started, ended, pid, host, run_id],
            )
        else:
            con.execute(
                "INSERT INTO runs (run_id, flow, parameters, started, ended, status, pid, host) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                [run_id, flow, params, started or _utcnow(), ended, status, pid, host],
            )
        con.commit()


def runs_to_check(ended_since: datetime | None = None, root: Path | None = None) -> list[dict]:
    """Runs whose status may be out of date: every `running` one, plus (with
    ``ended_since``) the completed and failed ones that ended since then."""
    if not catalog_path(root).exists():
        return []
    with _connect(root) as con:
        con.execute(_TABLES)
        result = con.execute(
            "SELECT run_id, flow, status, started, ended, pid, host FROM runs "
            "WHERE status = 'running' OR (status IN ('completed', 'failed') AND ended >= ?)",
            [_naive_utc(ended_since)],
        )
        names = [d[0] for d in result.description]
        return [dict(zip(names, row, strict=True)) for row in result.fetchall()]


def set_run_status(
    run_id: str, status: str, ended: datetime | None, was: str, root: Path | None = None
) -> bool:
    """Set a run's status and end time, only if its status is still ``was`` (a run
    that recorded its own end meanwhile keeps it). Returns whether the row changed."""
    with _connect(root) as con:
        con.begin()
        con.execute(_TABLES)
        changed = con.execute(
            "UPDATE runs SET status = ?, ended = coalesce(?, ended) "
            "WHERE run_id = ? AND status = ? RETURNING run_id",
            [status, _naive_utc(ended), run_id, was],
        ).fetchall()
        con.commit()
        return bool(changed)


class ReadOnlyQuery(ValueError):
    """A statement that could write, given to `sql` (which only reads)."""


# Functions that change the session or write files even inside a SELECT.
_SIDE_EFFECT_FUNCTIONS = frozenset(
    {
        "checkpoint",
        "disable_logging",
        "disable_profiling",
        "enable_logging",
        "enable_profiling",
        "force_checkpoint",
        "json_execute_serialized_sql",
        "truncate_duckdb_logs",
        "write_log",
    }
)
# `EXPLAIN [ANALYZE] [(options)]` before the explained statement, after any comments.
_EXPLAIN_PREFIX = re.compile(
    r"(?:\s+|--[^\n]*|/\*.*?\*/)*explain\s*(?:analy[sz]e\b\s*)?(?:\([^()]*\)\s*)?",
    re.IGNORECASE | re.DOTALL,
)


def _function_names(tree: Any) -> set[str]:
    if isinstance(tree, dict):
        names = {tree["function_name"]} if isinstance(tree.get("function_name"), str) else set()
        return names.union(*(_function_names(v) for v in tree.values()))
    if isinstance(tree, list):
        return set().union(*(_function_names(v) for v in tree))
    return set()


def _write_risk(con: duckdb.DuckDBPyConnection, statement: duckdb.Statement) -> str | None:
    """Why the statement might write, or None when it only reads."""
    kind = statement.type
    if kind == duckdb.StatementType.EXPLAIN:
        # EXPLAIN ANALYZE runs the statement, so the explained statement must only read too.
        prefix = _EXPLAIN_PREFIX.match(statement.query)
        try:
            inner = con.extract_statements(statement.query[prefix.end() :]) if prefix else []
        except duckdb.ParserException:
            inner = []
        if len(inner) != 1:
            return "an EXPLAIN statement whose explained statement could not be checked"
        risk = _write_risk(con, inner[0])
        return f"EXPLAIN of {risk}" if risk else None
    if kind != duckdb.StatementType.SELECT:
        # DESCRIBE, SHOW, SUMMARIZE and the PRAGMAs that only return a table parse as SELECT.
        name = kind.name if kind.name.isidentifier() else " ".join(statement.query.split()[:2])
        return f"a statement of type {name.upper()}"
    # The parse tree names every function the statement calls.
    (tree,) = con.execute("SELECT json_serialize_sql(?)", [statement.query]).fetchone()
    tree = json.loads(tree)
    if tree.get("error"):
        return "a statement that could not be checked"
    unsafe = sorted(_function_names(tree) & _SIDE_EFFECT_FUNCTIONS)
    return f"a call of {', '.join(unsafe)}" if unsafe else None


def _check_reads_only(con: duckdb.DuckDBPyConnection, query: str) -> list[duckdb.Statement]:
    """The statements of ``query``; ReadOnlyQuery if any of them might write."""
    statements = con.extract_statements(query)
    if not statements:
        raise ValueError("the query has no SQL statement")
    for statement in statements:
        risk = _write_risk(con, statement)
        if risk:
            # Some rewritten statements (the type a PIVOT creates) have no text of their own.
            text = " ".join((statement.query or query).split())
            text = text if len(text) <= 80 else text[:77] + "..."
            raise ReadOnlyQuery(
                f"refused {risk} ({text!r}): flywheel sql only reads (SELECT, DESCRIBE, "
                "SHOW, SUMMARIZE, EXPLAIN); datasets are written by flows or "
                "flywheel.store.write_dataset, and `flywheel shell` opens a scratch copy of "
                "the catalog"
            )
    return statements


def sql(query: str, root: Path | None = None) -> pd.DataFrame:
    """Run read-only statements on the catalog; the last one's result, as a DataFrame.

    The connection is read-only and every statement is checked first: one that could
    write (COPY, ATTACH, SET, PRAGMA, INSERT, ...) raises ReadOnlyQuery and nothing runs.
    """
    if not catalog_path(root).exists():
        refresh_catalog(root)
    with connect_read_only(root) as con:
        for statement in _check_reads_only(con, query):
            result = con.execute(statement)
        if con.description is None:
            return pd.DataFrame()
        return result.df()
