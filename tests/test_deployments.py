"""The user's path end to end: `flywheel up` starts a real Prefect server and the serve
process, `prefect deployment run ... --watch` runs the deployments, `flywheel sql` and the
duckdb CLI read what they wrote, `flywheel down` stops everything."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from flywheel.flows.deployments import NIGHTLY_UTC
from tests.conftest import free_port

BIN = Path(sys.executable).parent


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[dict]:
    env = {
        **os.environ,
        "PREFECT_API_URL": f"http://127.0.0.1:{free_port()}/api",
        "FLYWHEEL_DATA_DIR": str(tmp_path / "data"),
        "PREFECT_HOME": str(tmp_path / "prefect-home"),
    }

    def run(*args: str, timeout: float = 240) -> str:
        done = subprocess.run(
            args, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=timeout
        )
        assert done.returncode == 0, f"{args} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        return done.stdout

    up = run(str(BIN / "flywheel"), "up", "--wait-s", "90")
    registered = next(line for line in up.splitlines() if "deployments registered:" in line)
    for name in NIGHTLY_UTC:
        assert name in registered
    try:
        yield {"run": run, "env": env, "data": tmp_path / "data"}
    finally:
        subprocess.run([str(BIN / "flywheel"), "down"], env=env, cwd=tmp_path, timeout=60)


def test_deployments_run_by_hand_and_are_scheduled_nightly(stack) -> None:
    run, data = stack["run"], stack["data"]
    prefect = str(BIN / "prefect")
    for name, cron in NIGHTLY_UTC.items():
        assert cron in run(prefect, "deployment", "inspect", name)

    tiny = {
        "small_budget_s": 3,
        "large_budget_s": 4,
        "eval_tasks": 30,
        "shop_agent_budget_s": 3,
        "shop_agent_eval_intents": 5,
    }
    out = run(
        prefect,
        "deployment",
        "run",
        "world/bootstrap",
        "--watch",
        "--param",
        f"params={json.dumps(tiny)}",
    )
    assert "Completed" in out
    assert (data / "_models" / "world-large" / "config.json").exists()

    synth = {"n_references": 6, "samples_per_feature": 3}
    out = run(
        prefect,
        "deployment",
        "run",
        "synth/reference",
        "--watch",
        "--param",
        f"params={json.dumps(synth)}",
    )
    assert "Completed" in out

    table = run(
        str(BIN / "flywheel"),
        "sql",
        "select family, count(*) n from reference_synth group by 1",
        "--csv",
    )
    counts = [int(line.split(",")[1]) for line in table.strip().splitlines()[1:]]
    assert sum(counts) > 0
    reward = {"world_pairs": 200, "epochs": 1.0}
    out = run(
        prefect,
        "deployment",
        "run",
        "reward/train",
        "--watch",
        "--param",
        f"params={json.dumps(reward)}",
    )
    assert "Completed" in out
    models = run(str(BIN / "flywheel"), "sql", "select name, kind from models", "--csv")
    assert models.split() == ["name,kind", "world-preference-pairs-rm,bradley-terry"]
    # Collab with its default target reward: the reward model reward/train just published
    collab = {"world_prompts": 6, "k": 2, "rollout_len": 4, "max_new_tokens": 6}
    out = run(
        prefect,
        "deployment",
        "run",
        "decode/collab",
        "--watch",
        "--param",
        f"params={json.dumps(collab)}",
    )
    assert "Completed" in out
    decoded = run(
        str(BIN / "flywheel"),
        "sql",
        "select count(*) n, count(reward) scored from decoded_collab",
        "--csv",
    )
    assert decoded.split() == ["n,scored", "6,6"]

    runs = run(
        str(BIN / "duckdb"),
        str(data / "flywheel.duckdb"),
        "-csv",
        "-c",
        "select flow, status from runs order by started",
    )
    assert runs.split() == [
        "flow,status",
        "world/bootstrap,completed",
        "synth/reference,completed",
        "reward/train,completed",
        "decode/collab,completed",
    ]
    assert "running (pid" in run(str(BIN / "flywheel"), "status")
