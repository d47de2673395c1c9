"""The catalog: dataset views, ``runs``, ``models`` and ``lineage``, in the store's
DuckLake (`flywheel.store.lake`: ``<root>/lake/catalog.sqlite`` and its data files).

Readers never block writers, and writers in several processes take turns on the SQLite
catalog database (a commit that meets another is run again), so a DuckDB shell left
open on the lake (`flywheel shell`) holds up no flow. A store whose catalog was the
older ``flywheel.duckdb`` file has its ``runs`` copied into the lake once; views,
models and lineage are rebuilt from the version folders' meta files.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import duckdb
import pandas as pd

from flywheel.store import lake
from flywheel.store.datasets import (
    CatalogBusy,
    DatasetRef,
    data_root,
    list_datasets,
    list_versions,
    read_dataset,
)
from flywheel.store.models import ModelRef, list_model_versions, list_models, read_model

OLD_CATALOG_FILE = "flywheel.duckdb"  # the catalog before the lake: its runs are adopted
VIEW_COMMENT = "flywheel dataset"
INLINED_ROWS = 1000  # inserts of up to this many rows into the bookkeeping tables

_TABLES = """
CREATE TABLE IF NOT EXISTS runs (
    run_id VARCHAR,
    flow VARCHAR,
    parameters VARCHAR,
    started TIMESTAMP,
    ended TIMESTAMP,
    status VARCHAR,
    -- the process that ran it, so a run whose process died can be marked crashed
    pid INTEGER,
    host VARCHAR
);
CREATE TABLE IF NOT EXISTS lineage (
    dataset VARCHAR,
    version VARCHAR,
    produced_by VARCHAR,
    input_dataset VARCHAR,
    input_version VARCHAR,
    recorded TIMESTAMP,
    -- `dataset`/`input_dataset` name a dataset or, where the kind says so, a model
    kind VARCHAR,
    input_kind VARCHAR
);
CREATE TABLE IF NOT EXISTS models (
    name VARCHAR,
    version VARCHAR,
    kind VARCHAR,
    path VARCHAR,
    produced_by VARCHAR,
    metrics VARCHAR,
    created TIMESTAMP
);
"""


def catalog_path(root: Path | None = None) -> Path:
    """Path of the lake's catalog database (there once anything has been recorded)."""
    return lake.catalog_file(data_root(root))


@contextmanager
def _connect(
    root: Path | None = None, *, read_only: bool = False
) -> Iterator[duckdb.DuckDBPyConnection]:
    """A cursor on the lake with `lake` as the default database, so the tables and views
    are named as they are in `flywheel sql` and `flywheel shell`."""
    with lake.connect(data_root(root), read_only=read_only) as con:
        con.execute(f"USE {lake.LAKE}")
        yield con


def _write(root: Path | None, work: Callable[[duckdb.DuckDBPyConnection], Any]) -> Any:
    """`work` in one lake transaction, run again while another writer commits; the
    first write to a new lake makes the tables in the same transaction."""
    base = data_root(root)

    def with_tables(con: duckdb.DuckDBPyConnection) -> Any:
        if not _has_table(con, "runs"):
            _make_tables(con, base)
        return work(con)

    try:
        with _connect(base) as con:
            return lake.write(con, with_tables)
    except duckdb.Error as err:
        if "database is locked" not in str(err):
            raise
        raise CatalogBusy(
            f"the catalog {catalog_path(root)} stayed locked by other writers for "
            f"{lake.LOCKED_WAIT_S:.0f} s: {err}"
        ) from err


def _make_tables(con: duckdb.DuckDBPyConnection, base: Path) -> None:
    """The three tables, and the runs of the store's old catalog file if it has one."""
    # a few rows per run, in schema main: kept in the catalog database, not a parquet
    # file per insert (and delete files per update) piling up for years
    con.execute(
        f"CALL {lake.LAKE}.set_option('data_inlining_row_limit', {INLINED_ROWS}, schema => 'main')"
    )
    con.execute(_TABLES)
    if old_runs := _old_runs(base / OLD_CATALOG_FILE):
        marks = ", ".join("?" * len(_RUN_COLUMNS))
        con.executemany(f"INSERT INTO runs VALUES ({marks})", old_runs)


def _old_runs(old: Path) -> list[tuple]:
    """The runs of a store's earlier DuckDB catalog file, in `_RUN_COLUMNS` order."""
    if not old.exists():
        return []
    con = duckdb.connect(str(old), read_only=True, config=lake.NO_EXTENSION_INSTALLS)
    try:
        columns = {r[0] for r in con.execute("DESCRIBE runs").fetchall()}
        picked = [c if c in columns else f"NULL AS {c}" for c in _RUN_COLUMNS]
        return con.execute(f"SELECT {', '.join(picked)} FROM runs").fetchall()
    except duckdb.CatalogException:
        return []  # an old catalog that never recorded a run
    finally:
        con.close()


def _has_table(con: duckdb.DuckDBPyConnection, table: str) -> bool:
    found = con.execute(
        "SELECT 1 FROM duckdb_tables() WHERE database_name = ? AND table_name = ?",
        [lake.LAKE, table],
    )
    return found.fetchone() is not None


_RUN_COLUMNS = ("run_id", "flow", "parameters", "started", "ended", "status", "pid", "host")


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
            _naive_utc(datetime.fromisoformat(meta["created"])),
            ref.name,
            ref.version,
        ],
    )
    _add_lineage(con, ref)


def register_model(ref: ModelRef, root: Path | None = None) -> None:
    """Add one new model version to the catalog (its `models` row and lineage rows)."""
    _write(root, lambda con: _add_model(con, ref))


def register_version(ref: DatasetRef, root: Path | None = None) -> None:
    """Add one new version to the catalog (its views and lineage rows)."""
    base = data_root(root)

    def register(con: duckdb.DuckDBPyConnection) -> None:
        _create_view(con, f"{ref.name}__{ref.version}", ref)
        _create_latest_view(con, ref.name, base)
        _add_lineage(con, ref)

    _write(base, register)


def refresh_catalog(root: Path | None = None) -> None:
    """Rebuild every dataset view, add missing model and lineage rows; safe to run any time."""
    base = data_root(root)

    def refresh(con: duckdb.DuckDBPyConnection) -> None:
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
            "SELECT view_name FROM duckdb_views() "
            "WHERE database_name = ? AND NOT internal AND comment = ?",
            [lake.LAKE, VIEW_COMMENT],
        ).fetchall()
        for (view,) in stale:
            if view not in wanted:
                con.execute(f"DROP VIEW IF EXISTS {_ident(view)}")

    _write(base, refresh)


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

    def record(con: duckdb.DuckDBPyConnection) -> None:
        (updated,) = con.execute(
            "UPDATE runs SET flow = ?, parameters = ?, status = ?, "
            "started = coalesce(?, started), ended = coalesce(?, ended), "
            "pid = coalesce(?, pid), host = coalesce(?, host) WHERE run_id = ?",
            [flow, params, status, started, ended, pid, host, run_id],
        ).fetchone()
        if not updated:
            con.execute(
                "INSERT INTO runs (run_id, flow, parameters, started, ended, status, pid, host) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                [run_id, flow, params, started or _utcnow(), ended, status, pid, host],
            )

    _write(root, record)


def runs_to_check(ended_since: datetime | None = None, root: Path | None = None) -> list[dict]:
    """Runs whose status may be out of date: every `running` one, plus (with
    ``ended_since``) the completed and failed ones that ended since then."""
    if not catalog_path(root).exists():
        return []
    with _connect(root, read_only=True) as con:
        if not _has_table(con, "runs"):
            return []
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

    def update(con: duckdb.DuckDBPyConnection) -> bool:
        (changed,) = con.execute(
            "UPDATE runs SET status = ?, ended = coalesce(?, ended) "
            "WHERE run_id = ? AND status = ?",
            [status, _naive_utc(ended), run_id, was],
        ).fetchone()
        return bool(changed)

    return _write(root, update)


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
                "flywheel.store.write_dataset"
            )
    return statements


def sql(query: str, root: Path | None = None) -> pd.DataFrame:
    """Run read-only statements on the catalog; the last one's result, as a DataFrame.

    The connection is read-only and every statement is checked first: one that could
    write (COPY, ATTACH, SET, PRAGMA, INSERT, ...) raises ReadOnlyQuery and nothing runs.
    """
    if not catalog_path(root).exists():
        refresh_catalog(root)
    with _connect(root, read_only=True) as con:
        made = _has_table(con, "runs")
    if not made:  # a lake another process has just created, its tables still in the making
        _write(root, lambda con: None)
    with _connect(root, read_only=True) as con:
        for statement in _check_reads_only(con, query):
            result = con.execute(statement)
        if con.description is None:
            return pd.DataFrame()
        return result.df()
