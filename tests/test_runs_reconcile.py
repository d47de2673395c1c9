"""The catalog's `runs` follow what became of each run: killed runs (inside and outside
Prefect, run directly or by a served deployment) end up crashed, a run Prefect calls
crashed after the catalog recorded it completed is crashed, and an unreachable Prefect
changes nothing."""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from prefect.client.orchestration import get_client
from prefect.settings import PREFECT_API_URL, temporary_settings
from prefect.states import Crashed

from flywheel.flows.reconcile import reconcile_runs
from flywheel.store import record_run, sql
from tests.conftest import free_port

FLOW_SCRIPT = """
import sys
import time

from prefect import flow

from flywheel.flows.tracking import tracked_run


@flow(name="sleepy")
def sleepy(seconds: float = 300.0) -> str:
    with tracked_run("test/sleepy", {"seconds": seconds}) as run_id:
        print("RUN", run_id, flush=True)
        time.sleep(seconds)
    return run_id


if __name__ == "__main__":
    mode, seconds = sys.argv[1], float(sys.argv[2])
    if mode == "serve":
        sleepy.serve(name="sleepy")
    elif mode == "flow":
        sleepy(seconds)
    else:  # outside Prefect: the function alone
        sleepy.fn(seconds)
"""


def row(run_id: str) -> dict:
    found = sql(f"select * from runs where run_id = '{run_id}'").to_dict("records")
    assert len(found) == 1, f"no runs row for {run_id}"
    return found[0]


def naive_utc(dt: datetime) -> datetime:
    return dt.astimezone(UTC).replace(tzinfo=None)


def flow_run(run_id: str):
    with get_client(sync_client=True) as client:
        return client.read_flow_run(run_id)


def wait_for(check: Callable[[], object], what: str, timeout_s: float = 120):
    """Poll until `check()` is truthy (a guard against hanging, not a timing assertion)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if value := check():
            return value
        time.sleep(0.25)
    raise AssertionError(f"gave up waiting for {what}")


@pytest.fixture
def start(tmp_path: Path, data_dir: Path) -> Iterator[Callable[..., subprocess.Popen]]:
    """Start the sleepy flow script in a process of its own; every process is gone after
    the test."""
    script = tmp_path / "sleepy_flow.py"
    script.write_text(FLOW_SCRIPT)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(
        FLYWHEEL_DATA_DIR=str(data_dir),
        PREFECT_HOME=str(tmp_path / "prefect_home"),
        PREFECT_RUNNER_POLL_FREQUENCY="1",
        PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW="ignore",
    )
    if PREFECT_API_URL.value():
        env["PREFECT_API_URL"] = PREFECT_API_URL.value()
    started: list[subprocess.Popen] = []

    def start_(mode: str, seconds: float = 300) -> subprocess.Popen:
        proc = subprocess.Popen(
            [sys.executable, str(script), mode, str(seconds)],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.PIPE,
            stderr=(tmp_path / f"{mode}-{len(started)}.log").open("w"),
            text=True,
        )
        started.append(proc)
        return proc

    yield start_
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def run_id_of(proc: subprocess.Popen) -> str:
    """The run id the script prints once its run is recorded as running."""
    for line in proc.stdout:
        if line.startswith("RUN "):
            return line.split()[1]
    raise AssertionError(f"the flow process ended ({proc.wait()}) before its run started")


def kill(pid: int, proc: subprocess.Popen | None = None) -> None:
    os.kill(pid, signal.SIGKILL)
    if proc is not None:
        proc.wait()


def test_a_killed_flow_run_is_crashed_in_the_catalog_and_in_prefect(prefect_api, start):
    proc = start("flow")
    run_id = run_id_of(proc)
    assert row(run_id)["status"] == "running"
    assert (row(run_id)["pid"], row(run_id)["host"]) == (proc.pid, socket.gethostname())
    assert flow_run(run_id).state_type.value == "RUNNING"
    assert reconcile_runs() == {}  # alive: left alone

    kill(proc.pid, proc)
    # killed mid-run, the process told nobody: Prefect still shows it running
    assert flow_run(run_id).state_type.value == "RUNNING"
    assert row(run_id)["status"] == "running"

    assert reconcile_runs() == {run_id: "crashed"}
    after = flow_run(run_id)
    assert after.state_type.value == "CRASHED" and str(proc.pid) in after.state.message
    assert row(run_id)["status"] == "crashed"
    assert row(run_id)["ended"] == naive_utc(after.end_time)
    assert reconcile_runs() == {}


def test_a_killed_run_outside_prefect_is_crashed_and_a_live_one_kept(data_dir, start):
    alive, killed = start("local"), start("local")
    alive_id, killed_id = run_id_of(alive), run_id_of(killed)
    assert alive_id.startswith("local-") and killed_id.startswith("local-")
    kill(killed.pid, killed)

    assert reconcile_runs() == {killed_id: "crashed"}
    assert row(killed_id)["status"] == "crashed" and row(killed_id)["ended"] is not None
    assert row(alive_id)["status"] == "running"

    kill(alive.pid)
    # SIGKILL lands asynchronously: wait until it has exited, leaving it unreaped (a
    # zombie), which counts as gone as well
    os.waitid(os.P_PID, alive.pid, os.WEXITED | os.WNOWAIT)
    assert reconcile_runs(recent=None) == {alive_id: "crashed"}


def test_a_served_run_killed_takes_prefects_crashed_state(prefect_api, start):
    from prefect.deployments import run_deployment

    server = start("serve")
    deployment = wait_for(lambda: _deployment_id("sleepy/sleepy"), "the served deployment")
    flow_run_id = str(run_deployment(deployment, parameters={"seconds": 300}, timeout=0).id)
    pid = wait_for(lambda: _pid_of(flow_run_id), "the served run to start")
    assert pid != server.pid  # the runner runs each flow run in a process of its own

    kill(pid)
    # the runner saw its child die and told Prefect; the catalog still says running
    crashed = wait_for(
        lambda: (run := flow_run(flow_run_id)).state_type.value == "CRASHED" and run,
        "Prefect to mark the run crashed",
    )
    assert row(flow_run_id)["status"] == "running"

    assert reconcile_runs() == {flow_run_id: "crashed"}
    assert row(flow_run_id)["status"] == "crashed"
    assert row(flow_run_id)["ended"] == naive_utc(crashed.end_time)


def _deployment_id(name: str):
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            return client.read_deployment_by_name(name).id
        except ObjectNotFound:
            return None


def _pid_of(run_id: str) -> int | None:
    if not Path(os.environ["FLYWHEEL_DATA_DIR"], "lake", "catalog.sqlite").exists():
        return None
    found = sql(f"select pid from runs where run_id = '{run_id}' and status = 'running'")
    return int(found["pid"][0]) if len(found) else None


def test_a_completed_run_that_prefect_calls_crashed_becomes_crashed(prefect_api, data_dir):
    from prefect import flow

    from flywheel.flows.tracking import tracked_run

    @flow(name="quick")
    def quick() -> str:
        with tracked_run("test/quick", {}) as run_id:
            return run_id

    run_id = quick()
    assert row(run_id)["status"] == "completed"
    with get_client(sync_client=True) as client:
        # what a runner reports when the process dies after the catalog recorded its end
        client.set_flow_run_state(run_id, Crashed(message="process exited -9"), force=True)
    prefect_run = flow_run(run_id)
    assert prefect_run.state_type.value == "CRASHED"

    assert reconcile_runs(recent=None) == {}  # as at a run's start: running rows only
    assert reconcile_runs() == {run_id: "crashed"}
    assert row(run_id)["status"] == "crashed"
    assert row(run_id)["ended"] == naive_utc(prefect_run.end_time)
    assert reconcile_runs() == {}


def test_prefect_unreachable_leaves_its_runs_unchanged(data_dir, caplog):
    done = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        text=True,
        capture_output=True,
        check=True,
    )
    dead_pid = int(done.stdout)  # a process that has ended
    host = socket.gethostname()
    prefect_id = "0b1c5d0e-1f7a-4c55-9d3a-2f1e8c6b7a90"
    record_run(prefect_id, "test/x", {}, "running", pid=dead_pid, host=host)
    record_run("local-1", "test/x", {}, "running", pid=dead_pid, host=host)
    record_run("local-2", "test/x", {}, "running", pid=dead_pid, host="another-host")

    with temporary_settings({PREFECT_API_URL: f"http://127.0.0.1:{free_port()}/api"}):
        with caplog.at_level(logging.DEBUG, logger="flywheel.flows.reconcile"):
            assert reconcile_runs() == {"local-1": "crashed"}
        assert "Prefect unreachable, 1 run(s) left as they are" in caplog.text
        assert row(prefect_id)["status"] == "running"
        assert row("local-2")["status"] == "running"  # another host's process: unknown here

        # and a tracked run starts and ends as usual
        from flywheel.flows.tracking import tracked_run

        with tracked_run("test/y", {}) as run_id:
            pass
    assert row(run_id)["status"] == "completed" and row(prefect_id)["status"] == "running"
