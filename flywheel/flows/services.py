"""Background services of a local install: the Prefect server and the serve process.

Each runs detached in its own process group with a pid file and a log under
`<data>/_run`, so `flywheel up` / `flywheel down` work across shells.

The server runs with Prefect's own protections, since a flow run can load models
and start work as the user: an auth string (generated once per install and kept,
readable by the user only, in the Prefect profile `<data>/_prefect/profiles.toml`,
which `prefect.toml` points the `prefect` CLI at), CSRF protection, and CORS
limited to the UI's own origin.
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import toml

from flywheel.llm.managed_server import signal_group
from flywheel.store import data_root

API_URL = os.environ.get("PREFECT_API_URL", "http://127.0.0.1:4200/api")
PROFILE = "flywheel"
AUTH_KEYS = ("PREFECT_API_AUTH_STRING", "PREFECT_SERVER_API_AUTH_STRING")


def prefect_home() -> Path:
    return data_root() / "_prefect"


def profiles_file() -> Path:
    return prefect_home() / "profiles.toml"


def auth_string() -> str:
    """The local server's auth string: read from the install's Prefect profile, or made
    once and written there (mode 0600, other profiles in the file kept)."""
    path = profiles_file()
    profiles: dict = tomllib.loads(path.read_text()) if path.exists() else {}
    ours = profiles.setdefault("profiles", {}).setdefault(PROFILE, {})
    token = ours.get("PREFECT_API_AUTH_STRING")
    if token and all(ours.get(k) == token for k in AUTH_KEYS) and profiles.get("active"):
        path.chmod(0o600)
        return token
    token = token or f"flywheel:{secrets.token_urlsafe(24)}"
    ours.update(dict.fromkeys(AUTH_KEYS, token))
    profiles.setdefault("active", PROFILE)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    # created 0600: the secret is never readable by others, not even for a moment
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write("# The local Prefect server's auth string (flywheel up). Keep it private.\n")
        f.write(toml.dumps(profiles))
    os.replace(tmp, path)
    return token


def client_env() -> dict[str, str]:
    """What a process the project starts needs to reach the local server."""
    return {"PREFECT_API_URL": API_URL, "PREFECT_API_AUTH_STRING": auth_string()}


def ui_origins(api_url: str = API_URL) -> str:
    """The UI's own origins (it is served by the server itself), comma-separated."""
    port = urlsplit(api_url).port or 4200
    return f"http://127.0.0.1:{port},http://localhost:{port}"


def server_env() -> dict[str, str]:
    """Prefect's own protections for the local server, as its settings."""
    return {
        "PREFECT_HOME": str(prefect_home()),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_API_AUTH_STRING": auth_string(),
        "PREFECT_SERVER_API_CSRF_PROTECTION_ENABLED": "true",
        "PREFECT_SERVER_API_CORS_ALLOWED_ORIGINS": ui_origins(),
    }


def server_requires_auth(api_url: str = API_URL) -> bool:
    """Whether the server refuses a request without credentials (health is always open)."""
    try:
        return httpx.get(f"{api_url}/admin/version", timeout=5).status_code == 401
    except httpx.HTTPError:
        return False


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


def running(name: str) -> bool:
    return _pid(name) is not None


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
        if not server_requires_auth():
            raise RuntimeError(
                f"a Prefect server without authentication already answers at {API_URL}: any "
                "web page could start flow runs on it. Stop it (`flywheel down`, or the "
                "`prefect server start` you ran) and run `flywheel up` again."
            )
        return f"Prefect server already answering at {API_URL}"
    prefect_home().mkdir(parents=True, exist_ok=True)
    prefect = str(Path(sys.executable).with_name("prefect"))
    port = str(urlsplit(API_URL).port or 4200)
    start(
        "server",
        [prefect, "server", "start", "--host", "127.0.0.1", "--port", port],
        env=server_env(),
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
    # the serve process and its flow runs use this server, its auth string and this data
    # folder, whatever folder they are started from
    env = {**client_env(), "FLYWHEEL_DATA_DIR": str(data_root())}
    pid = start("serve", [flywheel, "serve"], env=env)
    return f"serve process running (pid {pid}); log: {run_dir() / 'serve.log'}"
