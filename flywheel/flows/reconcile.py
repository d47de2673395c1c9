"""Bring the catalog's `runs` table in line with what became of each run: a run killed
before it could record its end is found (its process gone, or Prefect's state) and
recorded as crashed."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

from prefect.client.orchestration import get_client
from prefect.runtime import flow_run
from prefect.settings import PREFECT_API_URL
from prefect.states import Crashed

from flywheel.store.catalog import runs_to_check
from flywheel.store.publish import set_run_status

# Prefect state types a run ends in; the catalog's status is the type in lower case.
_ENDED = {"COMPLETED", "FAILED", "CANCELLED", "CRASHED"}


def reconcile_runs(recent: timedelta | None = timedelta(days=1)) -> dict[str, str]:
    """Bring the catalog's `runs` in line with what became of each run; returns
    {run_id: new status} for the rows it changed.

    A `running` row whose flow run ended in Prefect takes Prefect's state (crashed,
    cancelled, failed, completed) and end time. A `running` row whose process (its pid
    on this host) is gone is crashed: a killed process never tells Prefect, which then
    shows the run running forever, so Prefect is told too (where it knows the run), and
    `ended` is when the process was found gone. With `recent`, completed and failed
    rows that ended within it are checked against Prefect as well (a run killed after
    recording its end). Prefect unreachable: rows with Prefect ids stay as they are."""
    log = logging.getLogger(__name__)
    rows = runs_to_check(datetime.now(UTC) - recent if recent else None)
    ids = [row["run_id"] for row in rows if _flow_run_uuid(row["run_id"])]
    changed: dict[str, str] = {}
    with contextlib.ExitStack() as stack:
        client, runs = None, None
        if ids and (PREFECT_API_URL.value() or flow_run.id is not None):
            try:
                client = stack.enter_context(get_client(sync_client=True))
                runs = _read_flow_runs(client, ids)
            except Exception as err:
                log.debug("Prefect unreachable, %d run(s) left as they are: %s", len(ids), err)
                client = None
        for row in rows:
            try:
                verdict = _verdict(row, runs, client)
                if verdict and set_run_status(row["run_id"], *verdict, was=row["status"]):
                    changed[row["run_id"]] = verdict[0]
            except Exception as err:
                log.debug("run %s not reconciled: %s", row["run_id"], err)
    for run_id, status in changed.items():
        log.info("run %s: recorded as %s", run_id, status)
    return changed


def _flow_run_uuid(run_id: str) -> uuid.UUID | None:
    """The Prefect flow run id in a run id; None for runs outside Prefect (`local-...`)."""
    try:
        return uuid.UUID(run_id)
    except ValueError:
        return None


def _read_flow_runs(client, ids: list[str]) -> dict:
    """{run id: FlowRun} of the ids Prefect knows."""
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    found = {}
    for start in range(0, len(ids), 200):  # the API's page size
        chunk = [uuid.UUID(i) for i in ids[start : start + 200]]
        flow_runs = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=chunk)), limit=len(chunk)
        )
        found.update({str(r.id): r for r in flow_runs})
    return found


def _verdict(row: dict, runs: dict | None, client) -> tuple[str, datetime] | None:
    """(status, ended) a row should have, or None to leave it."""
    run = None
    if _flow_run_uuid(row["run_id"]):
        if runs is None:
            return None  # Prefect could not be asked
        run = runs.get(row["run_id"])
    if run is not None and run.state_type is not None and run.state_type.value in _ENDED:
        status = run.state_type.value.lower()
        if status == row["status"]:
            return None
        return status, run.end_time or run.state.timestamp
    if row["status"] != "running" or not _process_gone(row["pid"], row["host"]):
        return None
    if run is not None and run.state_type is not None and run.state_type.value != "RUNNING":
        return None  # paused or being cancelled: Prefect's business
    ended = datetime.now(UTC)
    if run is not None:
        message = f"process {row['pid']} on {row['host']} is gone (found by reconcile_runs)"
        result = client.set_flow_run_state(run.id, Crashed(message=message))
        if result.state is not None and result.state.is_crashed():
            ended = result.state.timestamp
    return "crashed", ended


def _process_gone(pid: int | None, host: str | None) -> bool:
    """Whether the process that ran a row is known to be gone: only on this host."""
    if pid is None or host != socket.gethostname():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False  # alive, another user's
    try:  # a killed child its parent has not reaped yet is a zombie: gone too
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] == "Z"
