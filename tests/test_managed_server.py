"""ManagedServer against stand-in server scripts (tests/helpers/fake_server.py)."""

import json
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
    # within its 20 s startup timeout, or the message would say so
    with pytest.raises(ServerNeverCameUp) as err:
        server.start()
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
    with pytest.raises(ServerNeverCameUp, match="did not become healthy within 1.5 s"):
        server.start()
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
    assert time.monotonic() - t0 >= 0.5  # it waited for SIGTERM to work, then killed
    assert pid is not None and not alive(pid)


def test_make_backend_vllm_starts_and_stops_the_server(tmp_path: Path, monkeypatch) -> None:
    port = free_port()
    servers = tmp_path / "servers.toml"
    servers.write_text(
        f"[servers.fake]\ncommand = {json.dumps([sys.executable, FAKE, str(port)])}\n"
        f'base_url = "http://127.0.0.1:{port}/v1"\nstartup_timeout = 60\n'
    )
    monkeypatch.setenv("FLYWHEEL_SERVERS_FILE", str(servers))
    spec = BackendSpec(kind="vllm", model="m", server="fake")
    backend = make_backend(spec)
    assert isinstance(backend, OpenAIBackend)
    assert backend.base_url == f"http://127.0.0.1:{port}/v1"
    pid = backend.server.pid
    assert pid is not None and alive(pid)
    backend.close()
    assert not alive(pid)


def test_spec_check_missing_server_executable(tmp_path: Path, monkeypatch) -> None:
    servers = tmp_path / "servers.toml"
    servers.write_text('[servers.v]\ncommand = ["/nowhere/vllm", "serve", "m"]\nbase_url = "u"\n')
    monkeypatch.setenv("FLYWHEEL_SERVERS_FILE", str(servers))
    spec = BackendSpec(kind="vllm", model="m", server="v")
    with pytest.raises(BackendError, match="command '/nowhere/vllm' not found"):
        spec.check()
