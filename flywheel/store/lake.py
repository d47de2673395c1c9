"""DuckLake, DuckDB's lakehouse format, as the store's catalog: a catalog database plus
parquet data files, with snapshots, time travel, and readers that never block writers.

Where the lake is (`location`): by default a SQLite catalog in the data folder
(``<root>/lake/catalog.sqlite``) with its files beside it (``<root>/lake/files/``). For
several machines, the environment points every machine at one shared lake:

- ``FLYWHEEL_LAKE_CATALOG=postgres:<libpq connection string>``, e.g.
  ``postgres:dbname=flywheel host=db.internal user=flywheel`` (the password from
  ``PGPASSWORD`` or ``~/.pgpass``, so it is never part of what is shown);
- ``FLYWHEEL_LAKE_DATA_PATH=s3://<bucket>/<prefix>/`` with the usual ``AWS_ACCESS_KEY_ID``,
  ``AWS_SECRET_ACCESS_KEY`` (``AWS_SESSION_TOKEN``, ``AWS_REGION``) and, for an
  S3-compatible server, ``AWS_ENDPOINT_URL``; or a shared folder's absolute path.

The extensions it needs (``ducklake``, and ``sqlite_scanner``, ``postgres_scanner`` or
``httpfs`` as the location asks) come from the installed wheels
``duckdb-extension-<name>``, loaded by path; a connection never installs or downloads
one. An extension binary loads only in the DuckDB version it was built for, so the
project pins them and DuckDB to one version.

Writers to one SQLite catalog are serialized by it: a commit that meets another
process's commit fails with "database is locked" and is run again (`write`), never
half-applied. With PostgreSQL, a commit that conflicts with another one (both created
one table) fails with "Transaction conflict" and is run again the same way. Every insert
is written as parquet (no rows inlined into the catalog, unless a table's own option
says so), so the files a snapshot lists hold all of its rows.
"""

from __future__ import annotations

import contextlib
import importlib.resources
import os
import random
import re
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar
from urllib.parse import urlsplit

import duckdb

from flywheel.store.locks import file_lock
from flywheel.store.naming import StoreError, data_root

LAKE = "lake"  # the name the lake is attached under
EXTENSIONS = {  # extension name -> the wheel's package that ships its binary
    "ducklake": "duckdb_extension_ducklake",
    "sqlite_scanner": "duckdb_extension_sqlite_scanner",
    "postgres_scanner": "duckdb_extension_postgres_scanner",
    "httpfs": "duckdb_extension_httpfs",
}
# how long a write (or attach) keeps trying while other writers hold the catalog; an
# attempt may also wait out SQLite's own busy timeout (about 5 s) first
LOCKED_WAIT_S = 60.0
# what a commit that met another writer's says; the attempt is rolled back, run again
RETRYABLE = ("database is locked", "Transaction conflict", "duplicate key value")
NO_EXTENSION_INSTALLS = {"autoinstall_known_extensions": False, "autoload_known_extensions": False}
CATALOG_ENV = "FLYWHEEL_LAKE_CATALOG"
DATA_PATH_ENV = "FLYWHEEL_LAKE_DATA_PATH"

T = TypeVar("T")


class LakeUnavailable(StoreError):
    """The DuckLake extensions cannot be loaded (missing, or built for another DuckDB)."""


class NoLake(StoreError):
    """Nothing has been written to the lake yet: it has no catalog to read."""


@dataclass(frozen=True)
class Location:
    """Where a lake is: its catalog database and its data files."""

    catalog: str  # DuckLake's metadata: "sqlite:<file>" or "postgres:<connection string>"
    data_path: str  # a folder ending in "/", or "s3://<bucket>/<prefix>/"
    s3: tuple[tuple[str, str], ...] = ()  # the S3 secret's options, when data is in S3

    @property
    def on_postgres(self) -> bool:
        return self.catalog.startswith("postgres:")

    def extensions(self) -> list[str]:
        needed = ["ducklake", "postgres_scanner" if self.on_postgres else "sqlite_scanner"]
        return needed + (["httpfs"] if self.s3 else [])

    def shown_catalog(self) -> str:
        """The catalog for messages: no password, even one put in the connection string."""
        return re.sub(r"password\s*=\s*('[^']*'|\S+)", "password=***", self.catalog)

    def shown(self) -> str:
        return f"{self.shown_catalog()} with data at {self.data_path}"


def location(root: Path | None = None) -> Location:
    """The lake of data folder `root`, or the shared one the environment names (see the
    module's docstring). Bad settings are refused here, naming the variable."""
    catalog = os.environ.get(CATALOG_ENV, "").strip()
    if not catalog:
        catalog = f"sqlite:{catalog_file(root)}"
    elif not catalog.startswith("postgres:") or not catalog.removeprefix("postgres:").strip():
        raise StoreError(
            f"{CATALOG_ENV}={catalog!r}: give 'postgres:<libpq connection string>', e.g. "
            f"'postgres:dbname=flywheel host=db.internal user=flywheel', or unset it for "
            "the SQLite catalog in the data folder"
        )
    data_path = os.environ.get(DATA_PATH_ENV, "").strip()
    if not data_path:
        return Location(catalog, f"{lake_folder(root) / 'files'}/")
    if data_path.startswith("s3://"):
        if not urlsplit(data_path).netloc:
            raise StoreError(f"{DATA_PATH_ENV}={data_path!r}: give s3://<bucket>/<prefix>/")
        return Location(catalog, data_path.rstrip("/") + "/", _s3_secret_options())
    if "://" in data_path or not Path(data_path).is_absolute():
        raise StoreError(
            f"{DATA_PATH_ENV}={data_path!r}: give s3://<bucket>/<prefix>/ or a folder's "
            "absolute path (every machine must see the same files there)"
        )
    return Location(catalog, data_path.rstrip("/") + "/")


def _s3_secret_options() -> tuple[tuple[str, str], ...]:
    """DuckDB's S3 secret from the usual AWS variables (DuckDB itself reads none of them)."""
    missing = [v for v in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY") if not os.environ.get(v)]
    if missing:
        raise StoreError(
            f"{DATA_PATH_ENV} is in S3 but {' and '.join(missing)} "
            f"{'is' if len(missing) == 1 else 'are'} not set: export the bucket's credentials"
        )
    options = {
        "KEY_ID": os.environ["AWS_ACCESS_KEY_ID"],
        "SECRET": os.environ["AWS_SECRET_ACCESS_KEY"],
        "REGION": os.environ.get("AWS_REGION", os.environ.get("AWS_DEFAULT_REGION", "us-east-1")),
    }
    if token := os.environ.get("AWS_SESSION_TOKEN"):
        options["SESSION_TOKEN"] = token
    if endpoint := os.environ.get("AWS_ENDPOINT_URL", "").strip():
        parts = urlsplit(endpoint)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise StoreError(
                f"AWS_ENDPOINT_URL={endpoint!r}: give the server's URL, e.g. http://127.0.0.1:9000"
            )
        # an S3-compatible server (MinIO, moto, ...) takes bucket names in the path
        options |= {"ENDPOINT": parts.netloc, "URL_STYLE": "path"}
        options["USE_SSL"] = "true" if parts.scheme == "https" else "false"
    return tuple(options.items())


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


def load_statements(root: Path | None = None) -> list[str]:
    """The statements that load the lake's extensions by path, for a connection or the
    CLI, then give it the S3 credentials when its data is in S3."""
    where = location(root)
    loads = [f"LOAD {_literal(extension_path(name))}" for name in where.extensions()]
    return loads + ([_s3_secret_statement(where)] if where.s3 else [])


def _s3_secret_statement(where: Location) -> str:
    bucket = "s3://" + urlsplit(where.data_path).netloc + "/"
    options = [f"{key} {value if key == 'USE_SSL' else _literal(value)}" for key, value in where.s3]
    return (
        "CREATE OR REPLACE SECRET flywheel_lake_s3 "
        f"(TYPE s3, {', '.join(options)}, SCOPE {_literal(bucket)})"
    )


def shell_statements(root: Path | None = None) -> list[str]:
    """What the DuckDB CLI runs first to read the lake as `flywheel shell` opens it:
    no extension installed or downloaded, the extensions loaded by path, the lake
    attached read-only and made the default database."""
    return [
        "SET autoinstall_known_extensions = false",
        "SET autoload_known_extensions = false",
        *load_statements(root),
        attach_statement(root, read_only=True),
        f"USE {LAKE}",
    ]


def attach_statement(
    root: Path | None = None, *, read_only: bool = False, catalog: Path | None = None
) -> str:
    """ATTACH the lake. Read-write: every insert a parquet file (no rows inlined into the
    catalog unless a table's own option says so), on every connection, so the files of a
    snapshot hold all of its rows.
    `catalog`: another SQLite catalog file than the lake's (one being created)."""
    where = location(root)
    options = [f"DATA_PATH {_literal(where.data_path)}"]
    options.append("READ_ONLY" if read_only else "DATA_INLINING_ROW_LIMIT 0")
    source = _literal(f"ducklake:sqlite:{catalog}" if catalog else f"ducklake:{where.catalog}")
    return f"ATTACH {source} AS {LAKE} ({', '.join(options)})"


def exists(root: Path | None = None) -> bool:
    """Whether the lake has been created (by a first write)."""
    if not location(root).on_postgres:
        return catalog_file(root).exists()
    try:
        with connect(root, read_only=True):
            return True
    except NoLake:
        return False


# A connection per (process, lake, mode), kept open: loading the extensions and
# attaching take about 0.25 s, a write on an open one about 0.02 s. Each use gets its
# own cursor (DuckDB's way to use one database from several threads). Beside each, a
# dict for what a caller learns about that lake once per connection (`state`).
_open: dict[tuple[int, Location, bool], tuple[duckdb.DuckDBPyConnection, tuple | None, dict]]
_open = {}
_open_lock = threading.Lock()
MAX_OPEN = 8  # lakes kept attached per process; the least recently used is closed
# what a first attach to an empty PostgreSQL database says while another process is
# making the lake's tables there: attached again, it finds them
FIRST_ATTACH_RACE = ("already exists", "duplicate key value")


def state(root: Path | None = None, *, read_only: bool = False) -> dict:
    """The dict kept with this process's open connection to the lake (made anew with a
    new connection, e.g. once the catalog file was replaced): call inside `connect`."""
    key = (os.getpid(), location(root), read_only)
    with _open_lock:
        return _open[key][2]


def _attached(root: Path | None, read_only: bool) -> duckdb.DuckDBPyConnection:
    where = location(root)
    key = (os.getpid(), where, read_only)
    with _open_lock:
        cached = _open.pop(key, None)
        if cached is not None and cached[1] == catalog_identity(root):
            _open[key] = cached  # most recently used last
            return cached[0]
        if cached is not None:  # the catalog file was removed or replaced since
            cached[0].close()
        on_sqlite = not where.on_postgres
        if read_only and on_sqlite and not catalog_file(root).exists():
            raise NoLake(f"no lake at {lake_folder(root)}: nothing has been written to it yet")
        if not where.s3:
            Path(where.data_path).mkdir(parents=True, exist_ok=True)
        if not read_only and on_sqlite and not catalog_file(root).exists():
            _create(root)
        con = _loaded_connection(root)
        race = () if read_only or on_sqlite else FIRST_ATTACH_RACE
        try:
            _retry(lambda: con.execute(attach_statement(root, read_only=read_only)), race)
            if read_only:  # no statement through it changes a setting (e.g. autoinstall)
                con.execute("SET lock_configuration = true")
        except duckdb.Error as err:
            con.close()
            if "creating a new DuckLake is explicitly disabled" in str(err):
                shown = where.shown()
                raise NoLake(f"no lake in {shown}: nothing has been written to it yet") from None
            raise
        except BaseException:
            con.close()
            raise
        for stale in [k for k in _open if k[0] != key[0]]:
            del _open[stale]  # a forked parent's: never used, nor closed, here
        while len(_open) >= MAX_OPEN:
            _open.pop(next(iter(_open)))[0].close()
        _open[key] = (con, catalog_identity(root), {})
        return con


def _loaded_connection(root: Path | None) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB connection with the lake's extensions loaded by path."""
    con = duckdb.connect(config=NO_EXTENSION_INSTALLS)
    con.execute("SET enable_progress_bar = false")  # a flow's log, not a terminal
    for statement in load_statements(root):
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
        con = _loaded_connection(root)
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
    """Which SQLite catalog file is there now (device, inode), None when there is none
    (or the catalog is a PostgreSQL database, which is not replaced under a process)."""
    if location(root).on_postgres:
        return None
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
    holds the catalog ("database is locked") or conflicts with this one (PostgreSQL's
    "Transaction conflict"); what a failed attempt did is rolled back.

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


def _retry(step: Callable[[], T], also: tuple[str, ...] = ()) -> T:
    deadline = time.monotonic() + LOCKED_WAIT_S
    attempt = 0
    while True:
        try:
            return step()
        except duckdb.Error as err:
            # the SQLite catalog's lock: at a commit (TransactionException), and while
            # another process attaches or creates the lake (a plain duckdb.Error). Under
            # WAL a commit that finds another one newer than its reads fails at once, so
            # attempts are many and short, within a time budget. On PostgreSQL, a commit
            # that conflicts with a newer one (DuckLake retries snapshot id clashes
            # itself, then gives up with the key's error).
            retryable = any(text in str(err) for text in RETRYABLE + also)
            if not retryable or time.monotonic() > deadline:
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
