"""The catalog: dataset versions, ``versions``, ``runs``, ``models`` and ``lineage``, in
the store's DuckLake (`flywheel.store.lake`: ``<root>/lake/catalog.sqlite`` and its data
files).

A dataset version is the lake table ``<name>__<version>``, written with its ``versions``
row, its lineage rows and the view ``<name>`` (its latest version) in one transaction: a
crash mid-write leaves no part of it. Readers never block writers, and writers in
several processes take turns on the SQLite catalog database, so a DuckDB shell left open
on the lake (`flywheel shell`) holds up no flow. A store whose catalog was the older
``flywheel.duckdb`` file has its ``runs`` copied into the lake once; its version folders
move in with `flywheel store migrate`.

This module holds the catalog's tables, its connections and its reads (`sql` among
them); what adds to it is in `flywheel.store.publish`.
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
import pyarrow as pa

from flywheel.store import lake
from flywheel.store.naming import CatalogBusy, StoreError, data_root, version_table

OLD_CATALOG_FILE = "flywheel.duckdb"  # the catalog before the lake: its runs are adopted
INLINED_ROWS = 1000  # inserts of up to this many rows into the bookkeeping tables
BOOKKEEPING = ("runs", "lineage", "models", "versions")

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
    host VARCHAR,
    -- JSON: per backend and model, requests, retries, 429s, tokens (flywheel.llm.usage)
    model_calls VARCHAR
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
CREATE TABLE IF NOT EXISTS versions (
    name VARCHAR,
    version VARCHAR,
    created TIMESTAMP,
    produced_by VARCHAR,
    num_rows BIGINT,
    meta VARCHAR,
    arrow_schema BLOB
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
    try:
        with lake.connect(data_root(root), read_only=read_only) as con:
            con.execute(f"USE {lake.LAKE}")
            yield con
    except duckdb.Error as err:
        if "database is locked" not in str(err):
            raise
        raise CatalogBusy(
            f"the catalog {lake.location(root).shown_catalog()} stayed locked by other writers for "
            f"{lake.LOCKED_WAIT_S:.0f} s: {err}"
        ) from err


def write(root: Path | None, work: Callable[[duckdb.DuckDBPyConnection], Any]) -> Any:
    """`work` in one lake transaction, run again while another writer commits. A new
    lake gets its tables first, in transactions of their own."""
    base = data_root(root)
    with _connect(base) as con:
        known = lake.state(base)  # checked once per connection, not before every write
        if not known.get("tables"):
            if lake.write(con, lambda c: _make_tables(c, base)):
                lake.write(con, _inline_bookkeeping)  # options: of committed tables only
            else:
                lake.write(con, _add_new_columns)  # a lake made before they were
            known["tables"] = True
        return lake.write(con, work)


def _make_tables(con: duckdb.DuckDBPyConnection, base: Path) -> bool:
    """The bookkeeping tables, and the runs of the store's old catalog file if it has one,
    unless another process made them first. Returns whether this call made them."""
    if _has_table(con, "runs"):
        return False
    con.execute(_TABLES)
    if old_runs := _old_runs(base / OLD_CATALOG_FILE):
        marks = ", ".join("?" * len(_RUN_COLUMNS))
        con.executemany(f"INSERT INTO runs ({', '.join(_RUN_COLUMNS)}) VALUES ({marks})", old_runs)
    return True


NEW_COLUMNS = {"runs": {"model_calls": "VARCHAR"}}  # added after lakes were in use


def _add_new_columns(con: duckdb.DuckDBPyConnection) -> None:
    for table, columns in NEW_COLUMNS.items():
        for column, kind in columns.items():
            try:
                con.execute(f'SELECT "{column}" FROM {table} LIMIT 0')
            except duckdb.BinderException:
                con.execute(f'ALTER TABLE {table} ADD COLUMN IF NOT EXISTS "{column}" {kind}')


def _inline_bookkeeping(con: duckdb.DuckDBPyConnection) -> None:
    """A few rows per run or version: kept in the catalog database, not a parquet file
    per insert (and delete files per update) piling up for years. Dataset tables keep
    the attach's limit of 0, so every row of a version is in its parquet files."""
    for table in BOOKKEEPING:
        con.execute(
            f"CALL {lake.LAKE}.set_option('data_inlining_row_limit', {INLINED_ROWS}, "
            "table_name => ?)",
            [table],
        )


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
    # Looked up by name: listing the lake's tables (duckdb_tables and the like)
    # loads every table of a new snapshot, about 1 ms a table, on every version written.
    try:
        con.execute(f"SELECT 1 FROM {ident(table)} LIMIT 0")
    except duckdb.CatalogException:
        return False
    return True


_RUN_COLUMNS = ("run_id", "flow", "parameters", "started", "ended", "status", "pid", "host")


def utcnow() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


def naive_utc(dt: datetime | None) -> datetime | None:
    if dt is None or dt.tzinfo is None:
        return dt
    return dt.astimezone(UTC).replace(tzinfo=None)


def ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def dataset_versions(root: Path | None = None, name: str | None = None) -> dict[str, list[str]]:
    """{dataset: its versions, sorted} from the `versions` table (of one dataset if `name`)."""
    if not lake.exists(root):
        return {}
    with _connect(root, read_only=True) as con:
        if not _has_table(con, "versions"):
            return {}
        where, args = ("WHERE name = ?", [name]) if name is not None else ("", [])
        found = con.execute(
            f"SELECT name, version FROM versions {where} ORDER BY name, version", args
        ).fetchall()
    versions: dict[str, list[str]] = {}
    for dataset, version in found:
        versions.setdefault(dataset, []).append(version)
    return versions


def version_meta(name: str, version: str, root: Path | None = None) -> dict[str, Any]:
    """A dataset version's meta: name, version, created, produced_by, inputs, num_rows,
    columns (the written table's types)."""
    with _connect(root, read_only=True) as con:
        found = con.execute(
            "SELECT meta FROM versions WHERE name = ? AND version = ?", [name, version]
        ).fetchone()
    if found is None:
        raise StoreError(f"no version {version!r} of {name!r} in {lake.location(root).shown()}")
    return json.loads(found[0])


def version_files(name: str, version: str, root: Path | None = None) -> list[str]:
    """The parquet files of a dataset version, in row order."""
    with _connect(root, read_only=True) as con:
        found = con.execute(
            f"SELECT data_file, delete_file FROM ducklake_list_files('{lake.LAKE}', ?)",
            [version_table(name, version)],
        ).fetchall()
    if any(delete is not None for _, delete in found):  # a version table is never changed
        raise StoreError(f"{name}@{version} has rows deleted from its table in the lake")
    return [data for data, _ in found]


def version_rows(name: str, version: str, root: Path | None = None) -> pa.Table:
    """All rows of a dataset version, in the order they were written, with the arrow
    schema they were written with (types DuckDB reads back otherwise, such as a list's
    field name or a large string, and the schema's and fields' metadata)."""
    with _connect(root, read_only=True) as con:
        (written,) = con.execute(
            "SELECT arrow_schema FROM versions WHERE name = ? AND version = ?", [name, version]
        ).fetchone()
        rows = con.execute(f"SELECT * FROM {ident(version_table(name, version))}")
        table = rows.to_arrow_table()
    schema = pa.ipc.read_schema(pa.py_buffer(written))
    try:
        return table.cast(schema)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, ValueError):
        return table.replace_schema_metadata(schema.metadata)  # types as DuckDB read them


def runs_to_check(ended_since: datetime | None = None, root: Path | None = None) -> list[dict]:
    """Runs whose status may be out of date: every `running` one, plus (with
    ``ended_since``) the completed and failed ones that ended since then."""
    if not lake.exists(root):
        return []
    with _connect(root, read_only=True) as con:
        if not _has_table(con, "runs"):
            return []
        result = con.execute(
            "SELECT run_id, flow, status, started, ended, pid, host FROM runs "
            "WHERE status = 'running' OR (status IN ('completed', 'failed') AND ended >= ?)",
            [naive_utc(ended_since)],
        )
        names = [d[0] for d in result.description]
        return [dict(zip(names, row, strict=True)) for row in result.fetchall()]


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
    if not lake.exists(root):
        write(root, lambda con: None)  # the lake and its tables, for a first query
    with _connect(root, read_only=True) as con:
        made = _has_table(con, "runs")
    if not made:  # a lake another process has just created, its tables still in the making
        write(root, lambda con: None)
    with _connect(root, read_only=True) as con:
        for statement in _check_reads_only(con, query):
            result = con.execute(statement)
        if con.description is None:
            return pd.DataFrame()
        return result.df()
