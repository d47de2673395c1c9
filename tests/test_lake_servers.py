"""The lake shared by several machines: a PostgreSQL catalog and data files in S3.

Real servers, started and stopped here: PostgreSQL from the Debian packages (initdb and
pg_ctl, run as the `postgres` user when the tests run as root) and moto's S3-compatible
server on 127.0.0.1. Each test gets a database and a bucket prefix of its own. Without
the PostgreSQL binaries or moto, the server tests are skipped, saying which is missing;
the checks of the settings need no server."""

from __future__ import annotations

import itertools
import os
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from flywheel.store import (
    StoreError,
    lake,
    list_versions,
    read_dataset,
    record_run,
    sql,
    write_dataset,
)
from tests.helpers import lake_servers, two_writers
from tests.helpers.lake_servers import BUCKET, KEYS, s3_client

BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def postgres() -> Iterator[dict[str, str]]:
    """A PostgreSQL server on 127.0.0.1 for this module: its host, port, user, binaries."""
    if lake_servers.postgres_binaries() is None:
        pytest.skip(lake_servers.missing_part())
    with lake_servers.postgres_server() as server:
        yield server


@pytest.fixture(scope="module")
def s3() -> Iterator[str]:
    """moto's S3-compatible server on 127.0.0.1 for this module, with one bucket: its URL."""
    if not lake_servers.MOTO_SERVER.exists():
        pytest.skip(lake_servers.missing_part())
    with lake_servers.s3_server() as url:
        yield url


_databases = itertools.count()


@pytest.fixture
def shared_lake(postgres, s3, monkeypatch, tmp_path) -> Iterator[dict[str, str]]:
    """The environment of a machine on a shared lake: a new PostgreSQL database as its
    catalog and a new prefix of the bucket for its files. Processes started by the test
    inherit it."""
    database = f"lake_{os.getpid()}_{next(_databases)}"
    env = lake_servers.shared_lake_env(postgres, s3, database)
    env["FLYWHEEL_DATA_DIR"] = str(tmp_path / "machine-a")
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    yield env | {"database": database}
    lake.close_all()


def _objects(s3_url: str, prefix: str) -> set[str]:
    listed = s3_client(s3_url).list_objects_v2(Bucket=BUCKET, Prefix=prefix)
    return {f"s3://{BUCKET}/{item['Key']}" for item in listed.get("Contents", [])}


def _psql(postgres: dict[str, str], database: str, query: str) -> str:
    out = subprocess.run(
        [f"{postgres['bin']}/psql", "-h", postgres["host"], "-p", postgres["port"]]
        + ["-U", postgres["user"], "-d", database, "-At", "-c", query],
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    )
    return out.stdout.strip()


def test_versions_lineage_and_runs_live_in_postgres_and_s3(shared_lake, postgres, s3):
    write_dataset("items", [{"id": 1}], version="v1", produced_by="seed")
    write_dataset("items", [{"id": 1}, {"id": 2}], version="v2", produced_by="seed")
    record_run("run-1", "synth", {"n": 2}, "COMPLETED")

    assert list_versions("items") == ["v1", "v2"]
    assert read_dataset("items", "v1").to_arrow().to_pylist() == [{"id": 1}]
    assert sql("SELECT count(*) AS n FROM items").n[0] == 2  # the latest by default
    assert sorted(sql("SELECT version FROM lineage WHERE dataset = 'items'").version) == [
        "v1",
        "v2",
    ]
    assert sql("SELECT status FROM runs WHERE run_id = 'run-1'").status[0] == "COMPLETED"
    # the rows are parquet objects in the bucket, the bookkeeping is in PostgreSQL
    files = read_dataset("items", "v2").files()
    assert files and all(f.startswith(f"s3://{BUCKET}/{shared_lake['database']}/") for f in files)
    assert set(files) <= _objects(s3, shared_lake["database"])
    snapshots = int(
        _psql(postgres, shared_lake["database"], "SELECT count(*) FROM ducklake_snapshot")
    )
    assert snapshots >= 3
    assert read_dataset("items", "v2").to_hf()["id"] == [1, 2]
    # nothing of the lake in the machine's own data folder
    assert not lake.catalog_file().exists()
    assert not (lake.lake_folder() / "files").exists()


def test_another_machine_reads_and_adds_versions(shared_lake, tmp_path):
    write_dataset("items", [{"id": 1}], version="v1")
    # another process with a data folder of its own: a second machine on the same lake
    other = textwrap.dedent(
        """
        from flywheel.store import list_versions, read_dataset, write_dataset
        assert list_versions("items") == ["v1"], list_versions("items")
        assert read_dataset("items").to_arrow().to_pylist() == [{"id": 1}]
        write_dataset("items", [{"id": 2}], version="v2", produced_by="machine-b")
        """
    )
    env = {**os.environ, "FLYWHEEL_DATA_DIR": str(tmp_path / "machine-b")}
    done = subprocess.run(
        [sys.executable, "-c", other], env=env, capture_output=True, text=True, timeout=180
    )
    assert done.returncode == 0, done.stderr
    assert list_versions("items") == ["v1", "v2"]
    assert read_dataset("items").to_arrow().to_pylist() == [{"id": 2}]
    lineage = sql("SELECT produced_by FROM lineage WHERE version = 'v2'")
    assert lineage.produced_by.tolist() == ["machine-b"]


def test_two_processes_write_different_datasets_at_once(shared_lake, tmp_path):
    two_writers.in_two_processes(two_writers.write_many, tmp_path / "machine-a")
    two_writers.check_many(tmp_path / "machine-a")


def test_two_processes_write_one_dataset_at_once(shared_lake, tmp_path):
    two_writers.in_two_processes(two_writers.write_versions, tmp_path / "machine-a")
    two_writers.check_versions(tmp_path / "machine-a")


def test_two_machines_writing_one_version_at_once_land_it_once(shared_lake, tmp_path):
    for race in ("v1", "v2", "v3"):
        codes = two_writers.one_version_exit_codes(tmp_path / "machine-a", race)
        assert codes == [0, 3]  # one wins, the other is told the version exists
        versions = sql(f"SELECT produced_by FROM versions WHERE version = '{race}'")
        (winner,) = versions.produced_by
        rows = read_dataset("clash", race).to_arrow().to_pylist()
        assert rows == [{"who": winner, "row": r} for r in range(two_writers.COUNT)]
        lineage = sql(f"SELECT count(*) AS n FROM lineage WHERE version = '{race}'")
        assert lineage.n[0] == 1
    assert list_versions("clash") == ["v1", "v2", "v3"]


def _flywheel(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / "flywheel"), *args], capture_output=True, text=True, timeout=120
    )


@pytest.mark.skipif(not (BIN / "duckdb").exists(), reason="duckdb CLI (duckdb-cli) not installed")
def test_sql_and_shell_read_the_shared_lake(shared_lake):
    write_dataset("items", [{"id": 1}, {"id": 2}, {"id": 3}], version="v1")
    out = _flywheel("sql", "--format", "csv", "SELECT count(*) AS n FROM items")
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["n", "3"]
    out = _flywheel("sql", "DELETE FROM lineage")
    assert out.returncode != 0
    out = _flywheel("shell", "-csv", "-noheader", "-c", "select count(*) from items")
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["3"]
    assert "postgres:" in out.stderr and "s3://" in out.stderr
    assert KEYS["AWS_SECRET_ACCESS_KEY"] not in out.stderr + out.stdout
    out = _flywheel("shell", "-c", "insert into runs (run_id) values ('x')")
    assert out.returncode != 0 and "read" in out.stderr.lower()


def test_migrate_moves_an_old_data_folder_into_the_shared_lake(shared_lake, s3):
    from tests.test_store_migrate import OLD, _migrate

    shutil.copytree(OLD, shared_lake["FLYWHEEL_DATA_DIR"])
    assert "moved into the lake: 5 version(s)" in _migrate()
    assert list_versions("items") == ["v1", "v2"]
    assert sql("SELECT id FROM items").id.tolist() == [3]
    assert set(read_dataset("items", "v1").files()) <= _objects(s3, shared_lake["database"])
    assert "moved into the lake: 0 version(s)" in _migrate()  # idempotent here too


def test_an_empty_database_has_no_lake_until_a_first_write(shared_lake):
    assert not lake.exists()
    assert list_versions("items") == []
    write_dataset("items", [{"id": 1}])
    assert lake.exists()


# --- the settings, checked before any connection (no server needed) ---


@pytest.mark.parametrize(
    "catalog",
    ["sqlite:/tmp/x.sqlite", "postgres:", "dbname=flywheel", "postgresql://db/flywheel"],
)
def test_a_catalog_setting_that_is_not_postgres_is_refused(monkeypatch, catalog):
    monkeypatch.setenv(lake.CATALOG_ENV, catalog)
    with pytest.raises(StoreError, match=lake.CATALOG_ENV + ".*postgres:<libpq"):
        lake.location()


@pytest.mark.parametrize("path", ["files/", "s3://", "gs://bucket/x/", "http://host/x/"])
def test_a_data_path_that_is_not_s3_or_an_absolute_folder_is_refused(monkeypatch, path):
    monkeypatch.setenv(lake.DATA_PATH_ENV, path)
    with pytest.raises(StoreError, match=lake.DATA_PATH_ENV):
        lake.location()


def test_s3_without_credentials_names_the_variables(monkeypatch):
    monkeypatch.setenv(lake.DATA_PATH_ENV, "s3://bucket/lake/")
    monkeypatch.delenv("AWS_ACCESS_KEY_ID", raising=False)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "x")
    with pytest.raises(StoreError, match="AWS_ACCESS_KEY_ID is not set"):
        lake.location()
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "127.0.0.1:9000")
    with pytest.raises(StoreError, match="AWS_ENDPOINT_URL.*http://127.0.0.1:9000"):
        lake.location()


def test_s3_settings_become_a_secret_scoped_to_the_bucket(monkeypatch):
    monkeypatch.setenv(lake.CATALOG_ENV, "postgres:dbname=lake host=db password=hunter2")
    monkeypatch.setenv(lake.DATA_PATH_ENV, "s3://bucket/lake")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "https://objects.internal:9000")
    for name, value in KEYS.items():
        monkeypatch.setenv(name, value)
    where = lake.location()
    assert where.data_path == "s3://bucket/lake/"
    assert where.extensions() == ["ducklake", "postgres_scanner", "httpfs"]
    assert "hunter2" not in where.shown() and "password=***" in where.shown()
    (secret,) = [s for s in lake.load_statements() if "SECRET" in s]
    assert "SCOPE 's3://bucket/'" in secret
    assert "ENDPOINT 'objects.internal:9000'" in secret and "USE_SSL true" in secret
