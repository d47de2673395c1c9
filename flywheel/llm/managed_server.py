"""Start and stop a model server (e.g. `vllm serve MODEL`) from a configured command."""

from __future__ import annotations

import atexit
import os
import signal
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, NoReturn, Self
from urllib.parse import urlsplit

import httpx

from flywheel.llm.base import ServerNeverCameUp


def default_health_url(base_url: str) -> str:
    """`http://host:port/v1` -> `http://host:port/health`."""
    parts = urlsplit(base_url)
    return f"{parts.scheme}://{parts.netloc}/health"


def _tail(path: Path, n: int = 20) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return "(no log)"
    return "\n".join(lines[-n:])


def signal_group(pgid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass  # the group is already gone


def group_running(pgid: int) -> bool:
    """Whether a process of group `pgid` still runs (zombies, dead but not yet reaped by
    their parent, do not count)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # the process ended while we looked
        if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
            return True
    return False


class ManagedServer:
    """A server process in its own process group, healthy once `health_url` answers 200."""

    def __init__(
        self,
        command: Sequence[str],
        base_url: str,
        *,
        health_url: str | None = None,
        startup_timeout: float = 180,
        env: Mapping[str, str] | None = None,
        log_path: Path | None = None,
        stop_timeout: float = 10,
    ) -> None:
        self.command = [str(c) for c in command]
        self.base_url = base_url
        self.health_url = health_url or default_health_url(base_url)
        self.startup_timeout = startup_timeout
        self.env = dict(env or {})
        self.log_path = Path(log_path) if log_path else None
        self.stop_timeout = stop_timeout
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def start(self) -> Self:
        """Start the command and wait until it is healthy; raise ServerNeverCameUp if not."""
        if self._proc is not None:
            return self
        if self.log_path is None:
            fd, name = tempfile.mkstemp(prefix="flywheel-server-", suffix=".log")
            os.close(fd)
            self.log_path = Path(name)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self._proc = subprocess.Popen(
            self.command,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, **self.env},
            start_new_session=True,  # its own process group, so stop() reaches its children
        )
        # The server runs in its own session and would outlive us otherwise.
        atexit.register(self.stop)
        deadline = time.monotonic() + self.startup_timeout
        while True:
            code = self._proc.poll()
            if code is not None:
                self._fail(f"exited with code {code} before it became healthy")
            if self._healthy():
                return self
            if time.monotonic() > deadline:
                self._fail(f"did not become healthy within {self.startup_timeout:g} s")
            time.sleep(0.2)

    def _healthy(self) -> bool:
        try:
            return httpx.get(self.health_url, timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def _fail(self, what: str) -> NoReturn:
        self.stop()
        raise ServerNeverCameUp(
            f"server {' '.join(self.command)!r} {what} (health: {self.health_url}). "
            f"Last lines of {self.log_path}:\n{_tail(self.log_path)}"  # type: ignore[arg-type]
        )

    def stop(self) -> None:
        """SIGTERM the process group, SIGKILL after `stop_timeout` s. Safe to call twice."""
        proc, self._proc = self._proc, None
        if proc is not None:
            atexit.unregister(self.stop)
            signal_group(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=self.stop_timeout)
            except subprocess.TimeoutExpired:
                signal_group(proc.pid, signal.SIGKILL)
                proc.wait()
            # Children that outlived the leader would hold ports and GPU memory: kill them
            # and return only once they are gone (a signal takes effect asynchronously).
            signal_group(proc.pid, signal.SIGKILL)
            deadline = time.monotonic() + self.stop_timeout
            while group_running(proc.pid) and time.monotonic() < deadline:
                time.sleep(0.02)
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
