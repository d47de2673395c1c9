"""Deployments run from a Prefect work pool: two `flywheel worker` processes, started in
a project folder, register the deployments on a process pool and share its runs; each run
works in that folder's data/ and records itself there."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from prefect.client.orchestration import get_client
from prefect.deployments import run_deployment

from flywheel.store import sql

BIN = Path(sys.executable).parent


async def _pool_of(name: str) -> str | None:
    async with get_client() as client:
        try:
            return (await client.read_deployment_by_name(name)).work_pool_name
        except Exception:  # not registered yet
            return None


async def _final(run_ids: list) -> dict[str, str]:
    async with get_client() as client:
        runs = [await client.read_flow_run(i) for i in run_ids]
    return {str(r.id): r.state.type.value for r in runs if r.state and r.state.is_final()}


def test_two_workers_take_runs_from_the_pool(prefect_api, world_models, tmp_path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "FLYWHEEL_DATA_DIR"}
    env |= {"PREFECT_API_URL": prefect_api, "PREFECT_WORKER_QUERY_SECONDS": "1"}
    logs = {name: tmp_path / f"{name}.log" for name in ("w1", "w2")}
    workers: list[subprocess.Popen] = []

    def start(name: str) -> None:
        command = [str(BIN / "flywheel"), "worker", "--pool", "test-pool", "--name", name]
        out = open(logs[name], "w")  # noqa: SIM115 - closed with the process below
        workers.append(
            subprocess.Popen(
                [*command, "--limit", "1"], env=env, cwd=tmp_path, stdout=out, stderr=out
            )
        )

    try:
        start("w1")
        deadline = time.monotonic() + 180
        while asyncio.run(_pool_of("synth/reference")) != "test-pool":
            assert time.monotonic() < deadline, logs["w1"].read_text()[-3000:]
            assert workers[0].poll() is None, logs["w1"].read_text()[-3000:]
            time.sleep(1)
        start("w2")
        responder = {"model": str(world_models / "world-large")}
        runs = [
            run_deployment(
                "synth/reference",
                parameters={
                    "params": {
                        "n_references": 4,
                        "samples_per_feature": 2,
                        "seed": seed,
                        "responder": responder,
                    }
                },
                timeout=0,  # queued; the workers take them
            ).id
            for seed in range(4)
        ]
        deadline = time.monotonic() + 540
        while len(states := asyncio.run(_final(runs))) < len(runs):
            died = [w.args[5] for w in workers if w.poll() is not None]
            assert not died and time.monotonic() < deadline, (
                died,
                states,
                {n: p.read_text()[-3000:] for n, p in logs.items()},
            )
            time.sleep(2)
    finally:
        for worker in workers:
            worker.terminate()
        for worker in workers:
            worker.wait(60)
    assert set(states.values()) == {"COMPLETED"}, states
    took = {
        name: set(re.findall(r"submitting flow run '([0-9a-f-]+)'", path.read_text()))
        for name, path in logs.items()
    }
    assert took["w1"] | took["w2"] == {str(r) for r in runs}, took
    assert took["w1"] and took["w2"] and not took["w1"] & took["w2"], took
    # each run worked in the folder the workers started in, and recorded itself there
    recorded = sql("select run_id, status, parameters from runs", root=tmp_path / "data")
    assert set(recorded.run_id) == {str(r) for r in runs}
    assert set(recorded.status) == {"completed"}
    assert {json.loads(p)["seed"] for p in recorded.parameters} == {0, 1, 2, 3}
