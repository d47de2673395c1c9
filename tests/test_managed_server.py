"""ManagedServer against stand-in server scripts (tests/helpers/fake_server.py)."""

import os
import socket
import sys
import time
from pathlib import Path

import pytest

from flywheel.llm import (
    BackendError,
    BackendSpec,
    ManagedServer,
    OpenAIBackend,
    ServerNeverCameUp,
    make_backend,
)
from flywheel.llm.managed_server import default_health_url

FAKE = str(Path(__file__).parent / "helpers" / "fake_server.py")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def alive(pid: int) -> bool:
    """Running (not gone and not a zombie waiting to be reaped)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def fake(port: int, *args: str, tmp_path: Path, **kw) -> ManagedServer:
    return ManagedServer(
        [sys.executable, FAKE, str(port), *args],
        f"http://127.0.0.1:{port}/v1",
        log_path=tmp_path / "server.log",
        **kw,
    )


def test_default_health_url() -> None:
    assert default_health_url("http://127.0.0.1:8000/v1") == "http://127.0.0.1:8000/health"


def test_becomes_healthy_after_delay(tmp_path: Path) -> None:
    port = free_port()
    server = fake(port, "--delay", "1.0", tmp_path=tmp_path, startup_timeout=20)
    t0 = time.monotonic()
    with server:
        assert time.monotonic() - t0 >= 1.0
        pid = server.pid
        assert pid is not None and alive(pid)
    assert not alive(pid)
    assert "fake server starting" in (tmp_path / "server.log").read_text()
    server.stop()  # idempotent


def test_exits_at_once_reports_code_and_log_tail(tmp_path: Path) -> None:
    server = fake(free_port(), "--exit-code", "3", tmp_path=tmp_path, startup_timeout=20)
    t0 = time.monotonic()
    with pytest.raises(ServerNeverCameUp) as err:
        server.start()
    assert time.monotonic() - t0 < 10
    msg = str(err.value)
    assert "exited with code 3" in msg
    assert "fatal: cannot load model (fake)" in msg


def test_never_healthy_times_out_and_is_killed(tmp_path: Path) -> None:
    pid_file = tmp_path / "child.pid"
    server = fake(
        free_port(),
        "--never-healthy",
        "--child-pid-file",
        str(pid_file),
        tmp_path=tmp_path,
        startup_timeout=1.5,
    )
    t0 = time.monotonic()
    with pytest.raises(ServerNeverCameUp, match="did not become healthy within 1.5 s"):
        server.start()
    assert time.monotonic() - t0 < 6
    assert server.pid is None
    assert not alive(int(pid_file.read_text()))


def test_stop_kills_the_process_group(tmp_path: Path) -> None:
    pid_file = tmp_path / "child.pid"
    server = fake(free_port(), "--child-pid-file", str(pid_file), tmp_path=tmp_path)
    server.start()
    leader, child = server.pid, int(pid_file.read_text())
    assert leader is not None and alive(leader) and alive(child)
    assert os.getpgid(child) == leader  # same group, a new one
    server.stop()
    assert not alive(leader) and not alive(child)


def test_sigkill_after_stop_timeout(tmp_path: Path) -> None:
    server = fake(free_port(), "--ignore-term", tmp_path=tmp_path, stop_timeout=0.5)
    server.start()
    pid = server.pid
    t0 = time.monotonic()
    server.stop()
    assert 0.5 <= time.monotonic() - t0 < 5
    assert pid is not None and not alive(pid)


def test_make_backend_vllm_starts_and_stops_the_server(tmp_path: Path) -> None:
    port = free_port()
    spec = BackendSpec(
        kind="vllm", model="m", port=port, server_command=[sys.executable, FAKE, str(port)]
    )
    backend = make_backend(spec)
    assert isinstance(backend, OpenAIBackend)
    assert backend.base_url == f"http://127.0.0.1:{port}/v1"
    pid = backend.server.pid
    assert pid is not None and alive(pid)
    backend.close()
    assert not alive(pid)


def test_spec_check_missing_server_executable() -> None:
    spec = BackendSpec(kind="vllm", model="m", server_command=["/nowhere/vllm", "serve", "m"])
    with pytest.raises(BackendError, match="field: server_command"):
        spec.check()
