"""Background services of a local install: the Prefect server and the serve process.

Each runs detached in its own process group with a pid file and a log under
`<data>/_run`, so `flywheel up` / `flywheel down` work across shells.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from flywheel.llm.managed_server import signal_group
from flywheel.store import data_root

API_URL = os.environ.get("PREFECT_API_URL", "http://127.0.0.1:4200/api")


def run_dir() -> Path:
    path = data_root() / "_run"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (/proc/<pid>/stat field 22)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    if fields[0] == "Z":  # exited, not yet reaped
        return None
    return fields[19]


def _pid(name: str) -> int | None:
    """The pid in the pid file if that very process still runs (not a reused pid)."""
    path = run_dir() / f"{name}.pid"
    if not path.exists():
        return None
    pid_text, _, started = path.read_text().partition(" ")
    pid = int(pid_text)
    if _start_time(pid) is None or _start_time(pid) != started.strip():
        path.unlink(missing_ok=True)
        return None
    return pid


def status(name: str) -> str:
    pid = _pid(name)
    return f"{name}: running (pid {pid})" if pid else f"{name}: stopped"


def server_healthy(api_url: str = API_URL) -> bool:
    try:
        return httpx.get(f"{api_url}/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def start(name: str, command: list[str], env: dict | None = None) -> int:
    """Start `command` detached, unless it already runs; returns its pid."""
    pid = _pid(name)
    if pid:
        return pid
    log = open(run_dir() / f"{name}.log", "ab")
    proc = subprocess.Popen(
        command,
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
        env={**os.environ, **(env or {})},
    )
    (run_dir() / f"{name}.pid").write_text(f"{proc.pid} {_start_time(proc.pid)}")
    return proc.pid


def stop(name: str, grace_s: float = 15) -> bool:
    """SIGTERM the process group, SIGKILL after `grace_s`. False when it was not running."""
    pid = _pid(name)
    if not pid:
        return False
    signal_group(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and _pid(name):
        time.sleep(0.2)
    if _pid(name):
        signal_group(pid, signal.SIGKILL)
    (run_dir() / f"{name}.pid").unlink(missing_ok=True)
    return True


def start_server(timeout_s: float = 90) -> str:
    """Start `prefect server start` on 127.0.0.1 with its SQLite under <data>/_prefect."""
    if server_healthy():
        return f"Prefect server already answering at {API_URL}"
    home = data_root() / "_prefect"
    home.mkdir(parents=True, exist_ok=True)
    prefect = str(Path(sys.executable).with_name("prefect"))
    port = API_URL.rsplit(":", 1)[1].split("/")[0]
    start(
        "server",
        [prefect, "server", "start", "--host", "127.0.0.1", "--port", port],
        env={"PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"},
    )
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server_healthy():
            return f"Prefect server started at {API_URL} (UI: {API_URL.removesuffix('/api')})"
        if not _pid("server"):
            break
        time.sleep(0.5)
    log_tail = (run_dir() / "server.log").read_text()[-2000:]
    stop("server")
    raise RuntimeError(f"Prefect server did not come up in {timeout_s:.0f}s; log tail:\n{log_tail}")


def start_serve() -> str:
    """Start `flywheel serve` detached: registers deployments and runs what comes due."""
    flywheel = str(Path(sys.executable).with_name("flywheel"))
    # the serve process and its flow runs use this server and this data folder,
    # whatever folder they are started from
    env = {"PREFECT_API_URL": API_URL, "FLYWHEEL_DATA_DIR": str(data_root())}
    pid = start("serve", [flywheel, "serve"], env=env)
    return f"serve process running (pid {pid}); log: {run_dir() / 'serve.log'}"
