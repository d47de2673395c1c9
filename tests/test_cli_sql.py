"""`flywheel sql` only reads the catalog; `flywheel shell` opens the DuckDB CLI on the lake,
read-only, and neither holds up a flow.

Real stores in a temp data folder, the real DuckDB library and the real DuckDB CLI."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import duckdb
import pytest
from typer.testing import CliRunner

import flywheel.store.catalog as catalog
from flywheel.cli import app
from flywheel.store import lake, read_dataset, record_run, sql, write_dataset
from flywheel.store.catalog import ReadOnlyQuery, catalog_path

BIN = Path(sys.executable).parent
ROWS = [{"id": 1, "text": "a"}, {"id": 2, "text": "b"}, {"id": 3, "text": None}]

needs_cli = pytest.mark.skipif(
    not (BIN / "duckdb").exists(), reason="duckdb CLI (package duckdb-cli) not installed"
)


@pytest.fixture
def store(data_dir: Path) -> Path:
    """Two versions of `items` (the latest has 3 rows) in a fresh data folder."""
    write_dataset("items", ROWS[:1], version="v1")
    write_dataset("items", ROWS, version="v2")
    return data_dir


def files_under(folder: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


def views() -> set[str]:
    return set(sql("SELECT view_name FROM duckdb_views() WHERE NOT internal").view_name)


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, **extra}


def flywheel(*args: str, env: dict[str, str] | None = None, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / "flywheel"), *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        **kw,
    )


ATTACKS = [
    ("DELETE FROM lineage", "DELETE"),
    ("DROP VIEW items", "DROP"),
    ("COPY (SELECT 99 AS id, 'x' AS text) TO '{parquet}' (FORMAT parquet)", "COPY"),
    ("COPY items TO '{outside}/items.csv'", "COPY"),
    ("EXPLAIN ANALYZE COPY items TO '{outside}/explained.csv'", "EXPLAIN of .* COPY"),
    ("EXPORT DATABASE '{outside}/export'", "EXPORT"),
    ("ATTACH '{outside}/other.duckdb' AS other", "ATTACH"),
    ("INSTALL httpfs", "LOAD"),
    ("LOAD parquet", "LOAD"),
    ("SET threads = 1", "SET"),
    ("PRAGMA enable_profiling", "PRAGMA"),
    ("PRAGMA profiling_output = '{outside}/profile.json'", "SET"),
    ("SELECT * FROM enable_logging(storage := 'file', storage_path := '{outside}/logs')", "call"),
    ("CREATE TABLE scratch AS SELECT 1 AS one", "CREATE"),
    ("INSERT INTO runs (run_id) VALUES ('r')", "INSERT"),
    ("UPDATE lineage SET version = 'x'", "UPDATE"),
    ("CALL checkpoint()", "CALL"),
    ("SELECT 1; DROP VIEW items", "DROP"),
]


@pytest.mark.parametrize(("attack", "kind"), ATTACKS, ids=[a for a, _ in ATTACKS])
def test_sql_refuses_writes_and_changes_nothing(store, tmp_path, attack, kind):
    outside = tmp_path / "outside"
    outside.mkdir()
    parquet = read_dataset("items", "v1").files()[0]
    before_views = views()
    before_data = files_under(store)
    with pytest.raises(ReadOnlyQuery, match=rf"refused .*{kind}") as refused:
        sql(attack.format(parquet=parquet, outside=outside))
    message = str(refused.value)
    assert "flywheel sql only reads" in message
    assert "write_dataset" in message
    assert files_under(store) == before_data  # parquet bytes and the catalog file
    assert views() == before_views
    assert not list(outside.iterdir())


def test_read_only_connection_alone_lets_copy_write(store, tmp_path):
    # Why sql() checks statements: a lake attached read-only still lets COPY write files.
    target = tmp_path / "copied.csv"
    with lake.connect(store, read_only=True) as con:
        con.execute("USE lake")
        con.execute(f"COPY items TO '{target}'")
    assert target.exists()


def test_connection_settings_are_locked(store):
    with catalog._connect(read_only=True) as con:
        settings = dict(
            con.execute(
                "SELECT name, value FROM duckdb_settings() WHERE name IN "
                "('autoinstall_known_extensions', 'autoload_known_extensions', "
                "'lock_configuration')"
            ).fetchall()
        )
        with pytest.raises(duckdb.InvalidInputException, match="locked"):
            con.execute("SET autoinstall_known_extensions = true")
        with pytest.raises(duckdb.Error, match="read-only|read only"):
            con.execute("INSERT INTO runs (run_id) VALUES ('r')")
    assert settings == {
        "autoinstall_known_extensions": "false",
        "autoload_known_extensions": "false",
        "lock_configuration": "true",
    }


def test_sql_reads(store):
    assert sql("SELECT count(*) AS n FROM items").n[0] == 3
    assert sql("SELECT count(*) AS n FROM items__v1").n[0] == 1
    assert sql("DESCRIBE items").column_name.tolist() == ["id", "text"]
    tables = set(sql("SHOW TABLES").name)
    assert {"items", "items__v1", "items__v2", "lineage", "runs", "models"} <= tables
    assert set(sql("SUMMARIZE items").column_name) == {"id", "text"}
    assert "physical_plan" in set(sql("EXPLAIN SELECT * FROM items").explain_key)
    assert sql("SELECT 1 AS one; SELECT 2 AS two").columns.tolist() == ["two"]


def test_sql_builds_a_missing_catalog(tmp_path, monkeypatch):
    monkeypatch.setenv("FLYWHEEL_DATA_DIR", str(tmp_path / "new"))
    assert sql("SELECT count(*) AS n FROM runs").n[0] == 0
    assert catalog_path().is_file()


def test_a_writer_mid_transaction_does_not_hold_up_readers(store):
    # another process's uncommitted write: sql() in this one reads what was committed
    writer = subprocess.Popen(
        [sys.executable, "-c", _HOLD_A_WRITE, str(store)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert writer.stdout.readline().strip() == "inserted, not committed"
        assert sql("SELECT count(*) AS n FROM runs").n[0] == 0
        assert sql("SELECT count(*) AS n FROM items").n[0] == 3
        writer.communicate("commit\n", timeout=60)
    finally:
        writer.kill()
    assert writer.returncode == 0
    assert sql("SELECT run_id FROM runs").run_id.tolist() == ["held"]


_HOLD_A_WRITE = """
import sys
from pathlib import Path
from flywheel.store import lake
with lake.connect(Path(sys.argv[1])) as con:
    con.execute("BEGIN TRANSACTION")
    con.execute("INSERT INTO lake.runs (run_id, status) VALUES ('held', 'running')")
    print("inserted, not committed", flush=True)
    sys.stdin.readline()
    con.execute("COMMIT")
"""


# ----- the CLI -----


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("selec 1", "Parser Error"),
        ("select * from nope", "Catalog Error"),
        ("drop view items", "refused a statement of type DROP"),
    ],
)
def test_cli_error_is_one_line(store, query, expected):
    out = flywheel("sql", query)
    assert out.returncode == 1
    assert out.stdout == ""
    assert "Traceback" not in out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert expected in lines[0]
    assert views() >= {"items"}


def test_cli_json(data_dir):
    created = datetime(2024, 5, 6, 7, 8, 9)
    write_dataset(
        "typed",
        [
            {"id": 1, "score": 0.5, "when": created, "tags": ["a", "b"], "note": None},
            {"id": 2, "score": None, "when": created, "tags": [], "note": "n"},
        ],
    )
    result = CliRunner().invoke(app, ["sql", "select * from typed order by id", "--format", "json"])
    assert result.exit_code == 0, result.output
    records = json.loads(result.stdout)
    assert records == [
        {"id": 1, "score": 0.5, "when": created.isoformat(), "tags": ["a", "b"], "note": None},
        {"id": 2, "score": None, "when": created.isoformat(), "tags": [], "note": "n"},
    ]


@pytest.mark.parametrize("flags", [["--format", "csv"], ["--csv"]])
def test_cli_csv(store, flags):
    result = CliRunner().invoke(app, ["sql", "select id, text from items order by id", *flags])
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    assert rows == [
        {"id": "1", "text": "a"},
        {"id": "2", "text": "b"},
        {"id": "3", "text": ""},
    ]


def test_cli_csv_and_other_format_disagree(store):
    result = CliRunner().invoke(app, ["sql", "select 1", "--csv", "--format", "json"])
    assert result.exit_code == 1
    assert "disagree" in result.stderr


def test_cli_cuts_wide_table_to_terminal(data_dir):
    names = [f"column_{i:02d}" for i in range(12)]
    write_dataset("wide", [{n: i for i, n in enumerate(names)}])
    out = flywheel("sql", "select * from wide", env=_env(COLUMNS="40"))
    assert out.returncode == 0, out.stderr
    *table, note = out.stdout.rstrip("\n").splitlines()
    assert all(len(line) <= 40 for line in table), table
    shown = table[0].split()
    assert 0 < len(shown) < len(names)
    assert shown == names[: len(shown)]
    hidden = names[len(shown) :]
    assert note == f"... {len(hidden)} more columns: {', '.join(hidden)} (use --format csv)"
    # A wide terminal shows them all.
    out = flywheel("sql", "select * from wide", env=_env(COLUMNS="400"))
    assert out.stdout.splitlines()[0].split() == names


# ----- flywheel shell -----


def _held(proc: subprocess.Popen) -> None:
    """Wait until the duckdb process has its database open (it answers a query)."""
    proc.stdin.write("select 42;\n")
    proc.stdin.flush()
    assert proc.stdout.readline().strip() == "42", proc.stderr.read()


@needs_cli
def test_shell_reads_the_lake(store):
    out = flywheel("shell", "-csv", "-noheader", "-c", "select count(*) from items")
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["3"]
    assert "read-only" in out.stderr
    # attached read-only: the shell cannot change what flows wrote
    out = flywheel("shell", "-c", "insert into runs (run_id) values ('x')")
    assert out.returncode != 0 and "read" in out.stderr.lower()
    # the extensions came from the wheels: nothing was installed into ~/.duckdb
    query = (
        "select count(*) from duckdb_extensions() "
        "where installed and install_path like '%.duckdb/%'"
    )
    out = flywheel("shell", "-csv", "-noheader", "-c", query)
    assert out.stdout.split() == ["0"], out.stderr


@needs_cli
def test_shell_passes_duckdb_errors_through(store):
    out = flywheel("shell", "-c", "select * from nope")
    assert out.returncode != 0
    assert "nope" in out.stderr


@needs_cli
def test_open_shell_does_not_block_flows(store):
    shell = subprocess.Popen(
        [str(BIN / "flywheel"), "shell", "-csv", "-noheader"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        _held(shell)
        shell.stdin.write("select count(*) from items;\n")
        shell.stdin.flush()
        assert shell.stdout.readline().strip() == "3"
        # the shell stays open while this process writes a new version and records a run
        write_dataset("items", ROWS * 2, version="v3")
        record_run("while-open", "synth/reference", {}, "completed")
        assert sql("SELECT count(*) AS n FROM items").n[0] == 6
        # and its next query sees them
        out, err = shell.communicate(
            "select count(*) from items;\nselect status from runs where run_id = 'while-open';\n",
            timeout=60,
        )
    finally:
        if shell.poll() is None:
            shell.stdin.close()
            shell.wait(60)
    assert shell.returncode == 0, err
    assert out.split() == ["6", "completed"]
