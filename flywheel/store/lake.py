"""DuckLake, DuckDB's lakehouse format, as the store's catalog: a catalog database (SQLite
here, ``<root>/lake/catalog.sqlite``) plus parquet data files (``<root>/lake/files/``),
with snapshots, time travel, and readers that never block writers.

The two extensions it needs (``ducklake``, ``sqlite_scanner``) come from the installed
wheels ``duckdb-extension-ducklake`` and ``duckdb-extension-sqlite-scanner``, loaded by
path; a connection never installs or downloads one. An extension binary loads only in
the DuckDB version it was built for, so the project pins the three to one version.

Writers to one SQLite catalog are serialized by it: a commit that meets another
process's commit fails with "database is locked" and is run again (`write`), never
half-applied. Every insert is written as parquet (no rows inlined into the catalog,
unless a table's own option says so), so the files a snapshot lists hold all of its rows.
"""

from __future__ import annotations

import contextlib
import importlib.resources
import os
import random
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

import duckdb

from flywheel.store.datasets import StoreError, data_root
from flywheel.store.locks import file_lock

LAKE = "lake"  # the name the lake is attached under
EXTENSIONS = {  # extension name -> the wheel's package that ships its binary
    "ducklake": "duckdb_extension_ducklake",
    "sqlite_scanner": "duckdb_extension_sqlite_scanner",
}
# how long a write (or attach) keeps trying while other writers hold the catalog; an
# attempt may also wait out SQLite's own busy timeout (about 5 s) first
LOCKED_WAIT_S = 60.0
NO_EXTENSION_INSTALLS = {"autoinstall_known_extensions": False, "autoload_known_extensions": False}

T = TypeVar("T")


class LakeUnavailable(StoreError):
    """The DuckLake extensions cannot be loaded (missing, or built for another DuckDB)."""


def lake_folder(root: Path | None = None) -> Path:
    return data_root(root) / "lake"


def catalog_file(root: Path | None = None) -> Path:
    """The lake's catalog database (SQLite), there once the lake has been created."""
    return lake_folder(root) / "catalog.sqlite"


def extension_path(name: str) -> Path:
    """The binary of extension `name` inside its installed wheel, for this DuckDB."""
    package = EXTENSIONS[name]
    version = f"v{duckdb.__version__}"
    wheel = package.replace("_", "-")
    try:
        folder = importlib.resources.files(package) / "extensions" / version
    except ModuleNotFoundError:
        raise LakeUnavailable(
            f"the DuckDB extension {name!r} is not installed: install {wheel}=="
            f"{duckdb.__version__} (run scripts/setup.sh)"
        ) from None
    path = Path(str(folder)) / f"{name}.duckdb_extension"
    if not path.is_file():
        shipped = sorted(p.name for p in Path(str(folder)).parent.glob("v*"))
        raise LakeUnavailable(
            f"{wheel} has no {name} extension for DuckDB {version} (it ships {shipped}); "
            f"install {wheel}=={duckdb.__version__}, or the DuckDB its extension was built for"
        )
    return path


def _literal(text: str | Path) -> str:
    """`text` as a SQL string literal: paths come from the user (the data folder)."""
    return "'" + str(text).replace("'", "''") + "'"


def load_statements() -> list[str]:
    """The statements that load the extensions by path, for a connection or the CLI."""
    return [f"LOAD {_literal(extension_path(name))}" for name in EXTENSIONS]


def shell_statements(root: Path | None = None) -> list[str]:
    """What the DuckDB CLI runs first to read the lake as `flywheel shell` opens it:
    no extension installed or downloaded, the two loaded by path, the lake attached
    read-only and made the default database."""
    return [
        "SET autoinstall_known_extensions = false",
        "SET autoload_known_extensions = false",
        *load_statements(),
        attach_statement(root, read_only=True),
        f"USE {LAKE}",
    ]


def attach_statement(
    root: Path | None = None, *, read_only: bool = False, catalog: Path | None = None
) -> str:
    """ATTACH the lake. Read-write: every insert a parquet file (no rows inlined into the
    catalog unless a table's own option says so), on every connection, so the files of a
    snapshot hold all of its rows.
    `catalog`: another catalog file than the lake's (one being created)."""
    folder = lake_folder(root)
    data_path = f"{folder / 'files'}/"
    options = [f"DATA_PATH {_literal(data_path)}"]
    options.append("READ_ONLY" if read_only else "DATA_INLINING_ROW_LIMIT 0")
    source = _literal(f"ducklake:sqlite:{catalog or catalog_file(root)}")
    return f"ATTACH {source} AS {LAKE} ({', '.join(options)})"


# A connection per (process, lake, mode), kept open: loading the two extensions and
# attaching take about 0.25 s, a write on an open one about 0.02 s. Each use gets its
# own cursor (DuckDB's way to use one database from several threads). Beside each, a
# dict for what a caller learns about that lake once per connection (`state`).
_open: dict[tuple[int, str, bool], tuple[duckdb.DuckDBPyConnection, tuple | None, dict]] = {}
_open_lock = threading.Lock()
MAX_OPEN = 8  # lakes kept attached per process; the least recently used is closed


def state(root: Path | None = None, *, read_only: bool = False) -> dict:
    """The dict kept with this process's open connection to the lake (made anew with a
    new connection, e.g. once the catalog file was replaced): call inside `connect`."""
    key = (os.getpid(), str(lake_folder(root).absolute()), read_only)
    with _open_lock:
        return _open[key][2]


def _attached(root: Path | None, read_only: bool) -> duckdb.DuckDBPyConnection:
    folder = lake_folder(root)
    key = (os.getpid(), str(folder.absolute()), read_only)
    with _open_lock:
        cached = _open.pop(key, None)
        if cached is not None and cached[1] == catalog_identity(root):
            _open[key] = cached  # most recently used last
            return cached[0]
        if cached is not None:  # the catalog file was removed or replaced since
            cached[0].close()
        if read_only and not catalog_file(root).exists():
            raise StoreError(f"no lake at {folder}: nothing has been written to it yet")
        (folder / "files").mkdir(parents=True, exist_ok=True)
        if not read_only and not catalog_file(root).exists():
            _create(root)
        con = _loaded_connection()
        try:
            _retry(lambda: con.execute(attach_statement(root, read_only=read_only)))
            if read_only:  # no statement through it changes a setting (e.g. autoinstall)
                con.execute("SET lock_configuration = true")
        except BaseException:
            con.close()
            raise
        for stale in [k for k in _open if k[0] != key[0]]:
            del _open[stale]  # a forked parent's: never used, nor closed, here
        while len(_open) >= MAX_OPEN:
            _open.pop(next(iter(_open)))[0].close()
        _open[key] = (con, catalog_identity(root), {})
        return con


def _loaded_connection() -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB connection with the two extensions loaded by path."""
    con = duckdb.connect(config=NO_EXTENSION_INSTALLS)
    for statement in load_statements():
        try:
            con.execute(statement)
        except duckdb.Error as err:
            con.close()
            raise LakeUnavailable(f"{statement}: {err}") from err
    return con


def _create(root: Path | None) -> None:
    """Make a new lake's catalog under another name and link it into place, so no
    process ever finds a catalog file without the lake's tables in it (a reader that
    did was refused: "Existing DuckLake ... does not exist"). Of two processes that
    create it at once, the first link wins and the other's copy is removed.

    The catalog is made in WAL mode (kept in the file): readers then never wait for a
    writer's commit, and a writer waits only for another writer. In the default
    rollback-journal mode eight busy writers starved a reader loop to one read in 20 s."""
    final = catalog_file(root)
    making = final.with_name(f"{final.name}.{os.getpid()}.{threading.get_ident()}.new")
    try:
        with contextlib.closing(sqlite3.connect(making)) as db:
            db.execute("PRAGMA journal_mode = WAL")
        con = _loaded_connection()
        try:
            con.execute(attach_statement(root, catalog=making))
        finally:
            con.close()
        with contextlib.closing(sqlite3.connect(making)) as db:  # all of it in the file
            db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        try:
            os.link(making, final)
        except FileExistsError:
            pass
        except OSError:  # a file system without hard links: a rename, unless one is there
            if not final.exists():
                os.replace(making, final)
    finally:
        for leftover in (making, *(making.with_name(making.name + s) for s in ("-wal", "-shm"))):
            leftover.unlink(missing_ok=True)


def catalog_identity(root: Path | None) -> tuple[int, int] | None:
    """Which catalog file is there now (device, inode), None when there is none."""
    try:
        stat = catalog_file(root).stat()
    except FileNotFoundError:
        return None
    return (stat.st_dev, stat.st_ino)


@contextmanager
def connect(
    root: Path | None = None, *, read_only: bool = False
) -> Iterator[duckdb.DuckDBPyConnection]:
    """A DuckDB cursor with the lake attached as `lake` (created on the first read-write
    connect). Read-only: nothing through it can write the lake."""
    cursor = _attached(root, read_only).cursor()
    try:
        yield cursor
    finally:
        cursor.close()


def close_all() -> None:
    """Close this process's lake connections (tests, and before a folder is removed)."""
    with _open_lock:
        while _open:
            _open.popitem()[1][0].close()


def write(con: duckdb.DuckDBPyConnection, work: Callable[[duckdb.DuckDBPyConnection], T]) -> T:
    """Run `work` in one transaction, again from the start while another writer's commit
    holds the catalog ("database is locked"); what a failed attempt did is rolled back.

    So `work` must be safe to run again: statements on `con` only, its inputs read, not
    consumed. A failed attempt may leave parquet files no snapshot lists (DuckLake's
    `ducklake_delete_orphaned_files` removes them)."""

    def attempt() -> T:
        con.execute("BEGIN TRANSACTION")
        try:
            out = work(con)
            con.execute("COMMIT")
            return out
        except BaseException:
            with contextlib.suppress(duckdb.Error):  # a failed COMMIT has rolled back already
                con.execute("ROLLBACK")
            raise

    with _writers_take_turns(con):
        return _retry(attempt)


def _writers_take_turns(con: duckdb.DuckDBPyConnection) -> contextlib.AbstractContextManager:
    """This machine's writers to a SQLite catalog queue on a file lock beside it. Racing
    instead, a commit behind a newer one fails and runs again, and among eight writers
    one was still failing after 60 s."""
    found = con.execute(
        "SELECT path FROM duckdb_databases() WHERE database_name = ?", [LAKE]
    ).fetchone()
    if found is None or not str(found[0]).startswith("sqlite:"):
        return contextlib.nullcontext()
    return file_lock(found[0].removeprefix("sqlite:") + ".write.lock", log_wait=False)


def _retry(step: Callable[[], T]) -> T:
    deadline = time.monotonic() + LOCKED_WAIT_S
    attempt = 0
    while True:
        try:
            return step()
        except duckdb.Error as err:
            # the SQLite catalog's lock: at a commit (TransactionException), and while
            # another process attaches or creates the lake (a plain duckdb.Error). Under
            # WAL a commit that finds another one newer than its reads fails at once, so
            # attempts are many and short, within a time budget.
            if "database is locked" not in str(err) or time.monotonic() > deadline:
                raise
            time.sleep(min(0.5, 0.01 * 1.5**attempt) * (0.5 + random.random()))
            attempt += 1


def snapshots(con: duckdb.DuckDBPyConnection) -> list[dict]:
    """The lake's snapshots, oldest first: id, time and what each changed."""
    rows = con.execute(
        f"SELECT snapshot_id, snapshot_time, changes FROM ducklake_snapshots('{LAKE}') "
        "ORDER BY snapshot_id"
    ).fetchall()
    return [{"id": i, "time": t, "changes": c} for i, t, c in rows]


def files_at(
    con: duckdb.DuckDBPyConnection, table: str, snapshot: int, schema: str = "main"
) -> list[str]:
    """The parquet files that hold `table` at `snapshot`. Only tables that are appended to
    (never deleted from: a delete file would hide rows these files still hold) are read
    this way, e.g. by `datasets.load_dataset("parquet", data_files=...)`."""
    rows = con.execute(
        f"SELECT data_file, delete_file FROM ducklake_list_files('{LAKE}', ?, "
        "schema => ?, snapshot_version => ?)",
        [table, schema, snapshot],
    ).fetchall()
    if any(delete is not None for _, delete in rows):
        raise StoreError(f"{schema}.{table} at snapshot {snapshot} has deleted rows")
    return [data for data, _ in rows]
