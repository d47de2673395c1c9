"""Real servers for a lake shared by several machines, started and stopped on 127.0.0.1:
PostgreSQL from the Debian packages (initdb and pg_ctl, run as the `postgres` user when
started as root) as the catalog, and moto's S3-compatible server for the data files.
Used by tests/test_lake_servers.py and by `benchmarks/store_concurrency.py --shared-lake`.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from tests.helpers.ports import free_port

BUCKET = "flywheel-lake"
KEYS = {"AWS_ACCESS_KEY_ID": "test-key", "AWS_SECRET_ACCESS_KEY": "test-secret"}
MOTO_SERVER = Path(sys.executable).parent / "moto_server"


def postgres_binaries() -> Path | None:
    """The folder of PostgreSQL's server programs, or None where they are not installed."""
    found = shutil.which("pg_ctl")
    if found:
        return Path(found).resolve().parent
    folders = sorted(glob.glob("/usr/lib/postgresql/*/bin"))
    return Path(folders[-1]) if folders else None


def missing_part() -> str | None:
    """Why the servers cannot start here (a sentence naming the fix), or None."""
    if postgres_binaries() is None:
        return "no PostgreSQL server binaries (install Debian's postgresql package)"
    if not MOTO_SERVER.exists():
        return "no moto server (pip install 'moto[server]', a dev dependency)"
    return None


def _as_postgres(command: list[str]) -> list[str]:
    """PostgreSQL refuses to run as root: then the server runs as the `postgres` user."""
    return ["runuser", "-u", "postgres", "--", *command] if os.geteuid() == 0 else command


@contextmanager
def postgres_server() -> Iterator[dict[str, str]]:
    """A PostgreSQL server in a temporary folder: its host, port, user and binaries."""
    folder = postgres_binaries()
    assert folder is not None, missing_part()
    home = Path(tempfile.mkdtemp(prefix="flywheel-pg-"))
    if os.geteuid() == 0:
        shutil.chown(home, "postgres", "postgres")
    cluster, port = home / "cluster", free_port()
    run = dict(check=True, capture_output=True, text=True, timeout=120)
    subprocess.run(
        _as_postgres([str(folder / "initdb"), "-D", str(cluster), "-A", "trust", "-U", "lake"]),
        **run,
    )
    options = f"-p {port} -k {home} -c listen_addresses=127.0.0.1 -c fsync=off"
    pg_ctl = [str(folder / "pg_ctl"), "-D", str(cluster), "-l", str(home / "log"), "-w"]
    subprocess.run(_as_postgres([*pg_ctl, "-o", options, "start"]), **run)
    try:
        yield {"host": "127.0.0.1", "port": str(port), "user": "lake", "bin": str(folder)}
    finally:
        subprocess.run(_as_postgres([*pg_ctl, "-m", "immediate", "stop"]), timeout=60)
        shutil.rmtree(home, ignore_errors=True)


@contextmanager
def s3_server() -> Iterator[str]:
    """moto's S3-compatible server with the bucket `BUCKET`: its URL."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [str(MOTO_SERVER), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        for _ in range(300):
            try:
                httpx.get(url, timeout=1)
                break
            except httpx.TransportError:
                assert proc.poll() is None, "moto_server exited"
                time.sleep(0.1)
        s3_client(url).create_bucket(Bucket=BUCKET)
        yield url
    finally:
        proc.terminate()
        proc.wait(30)


def s3_client(url: str):
    import boto3

    return boto3.client(
        "s3",
        endpoint_url=url,
        region_name="us-east-1",
        aws_access_key_id=KEYS["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=KEYS["AWS_SECRET_ACCESS_KEY"],
    )


def shared_lake_env(postgres: dict[str, str], s3_url: str, database: str) -> dict[str, str]:
    """A new database `database` on the server, and the settings of a machine whose lake
    has it as the catalog and the prefix `database/` of the bucket for its files."""
    subprocess.run(
        [f"{postgres['bin']}/createdb", "-h", postgres["host"], "-p", postgres["port"]]
        + ["-U", postgres["user"], database],
        check=True,
        capture_output=True,
        timeout=60,
    )
    from flywheel.store import lake

    return {
        lake.CATALOG_ENV: f"postgres:host={postgres['host']} port={postgres['port']} "
        f"user={postgres['user']} dbname={database}",
        lake.DATA_PATH_ENV: f"s3://{BUCKET}/{database}/",
        "AWS_ENDPOINT_URL": s3_url,
        "AWS_REGION": "us-east-1",
        **KEYS,
    }
