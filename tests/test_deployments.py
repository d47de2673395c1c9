"""The user's path end to end: `flywheel up` starts a real Prefect server (with its auth
string, CSRF protection and CORS limited to the UI) and the serve process, `prefect
deployment run ... --watch` from a project folder runs the deployments, `flywheel sql` and
the duckdb CLI read what they wrote, `flywheel down` stops everything. A foreign web page
can start nothing, and no run parameter can make the serve process run a command."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from flywheel.flows.deployments import NIGHTLY_UTC
from tests.conftest import TEST_BOOTSTRAP, free_port

BIN = Path(sys.executable).parent


PROJECT = Path(__file__).parent.parent


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    tmp_path = tmp_path_factory.mktemp("stack")
    port = free_port()
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("PREFECT_") and k != "FLYWHEEL_DATA_DIR"
    }
    # the user's project folder: the project's prefect.toml (on a free port) and data/ in it,
    # so the prefect CLI finds the server and its auth string the way a user's does
    (tmp_path / "prefect.toml").write_text(
        (PROJECT / "prefect.toml").read_text().replace("4200", str(port))
    )

    def run(*args: str, timeout: float = 240) -> str:
        done = subprocess.run(
            args, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=timeout
        )
        assert done.returncode == 0, f"{args} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        return done.stdout

    up_env = {**env, "PREFECT_API_URL": f"http://127.0.0.1:{port}/api"}
    done = subprocess.run(
        [str(BIN / "flywheel"), "up", "--wait-s", "120"],
        env=up_env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, f"flywheel up failed:\n{done.stdout[-3000:]}\n{done.stderr}"
    up = done.stdout
    registered = next(line for line in up.splitlines() if "deployments registered:" in line)
    for name in NIGHTLY_UTC:
        assert name in registered
    try:
        yield {
            "run": run,
            "env": env,
            "data": tmp_path / "data",
            "folder": tmp_path,
            "api": f"http://127.0.0.1:{port}/api",
        }
    finally:
        subprocess.run([str(BIN / "flywheel"), "down"], env=up_env, cwd=tmp_path, timeout=60)


def test_deployments_run_by_hand_and_are_scheduled_nightly(stack) -> None:
    run, data = stack["run"], stack["data"]
    prefect = str(BIN / "prefect")
    started: list[str] = []  # the flow run ids of the runs started below
    # one `prefect deployment inspect` shows the CLI finds them; the API gives every schedule
    name = "synth/reference"
    assert NIGHTLY_UTC[name] in run(prefect, "deployment", "inspect", name)
    deployments = _post_as_user(stack, "/deployments/filter", {})
    flows = {f["id"]: f["name"] for f in _post_as_user(stack, "/flows/filter", {})}
    crons = {
        f"{flows[d['flow_id']]}/{d['name']}": [s["schedule"]["cron"] for s in d["schedules"]]
        for d in deployments
    }
    assert crons == {name: [cron] for name, cron in NIGHTLY_UTC.items()}

    tiny = {**TEST_BOOTSTRAP, "small_steps": 150, "large_steps": 60, "shop_agent_steps": 100}
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
    started.append(re.search(r"UUID: (\S+)", out).group(1))
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
    started.append(re.search(r"UUID: (\S+)", out).group(1))

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
    started.append(re.search(r"UUID: (\S+)", out).group(1))
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
    started.append(re.search(r"UUID: (\S+)", out).group(1))
    decoded = run(
        str(BIN / "flywheel"),
        "sql",
        "select count(*) n, count(reward) scored from decoded_collab",
        "--csv",
    )
    assert decoded.split() == ["n,scored", "6,6"]

    # the runs this test started (a nightly schedule may fire while it runs, e.g. at 01:00)
    ids = ", ".join(f"'{run_id}'" for run_id in started)
    runs = run(
        str(BIN / "flywheel"),
        "shell",
        "-csv",
        "-c",
        f"select flow, status from runs where run_id in ({ids}) order by started",
    )
    assert runs.split() == [
        "flow,status",
        "world/bootstrap,completed",
        "synth/reference,completed",
        "reward/train,completed",
        "decode/collab,completed",
    ]
    assert "running (pid" in run(str(BIN / "flywheel"), "status")


def test_foreign_pages_and_run_parameters_cannot_start_anything(stack) -> None:
    api, folder = stack["api"], stack["folder"]
    ui = api.removesuffix("/api")
    auth_string = stack["run"](str(BIN / "flywheel"), "server", "auth-string").strip()
    user, _, password = auth_string.partition(":")
    marker = folder / "marker"
    command = ["sh", "-c", f"id > {marker}"]
    attack = {
        "params": {
            "n_references": 2,
            "responder": {"kind": "vllm", "model": "m", "server_command": command},
        }
    }
    profile = folder / "data" / "_prefect" / "profiles.toml"
    assert profile.stat().st_mode & 0o777 == 0o600
    assert auth_string in profile.read_text()

    deployment = httpx.get(
        f"{api}/deployments/name/synth/reference", auth=(user, password), timeout=30
    ).json()["id"]
    url = f"{api}/deployments/{deployment}/create_flow_run"
    evil = {"Origin": "http://evil.example"}
    # a page on another site, without the auth string
    refused = httpx.post(url, json={"parameters": attack}, headers=evil, timeout=30)
    assert refused.status_code in (401, 403), refused.text
    # with the auth string but without the CSRF token only the server's own clients get
    refused = httpx.post(
        url, json={"parameters": attack}, headers=evil, auth=(user, password), timeout=30
    )
    assert refused.status_code == 403, refused.text
    # and a browser would not even send it: CORS allows only the UI's own origin
    preflight = {"Access-Control-Request-Method": "POST"}
    foreign = httpx.options(url, headers={**evil, **preflight}, timeout=30)
    assert foreign.headers.get("access-control-allow-origin") != "http://evil.example"
    own = httpx.options(url, headers={"Origin": ui, **preflight}, timeout=30)
    assert own.headers.get("access-control-allow-origin") == ui
    # the user themself, authenticated, cannot pass a command in the parameters either
    done = subprocess.run(
        [str(BIN / "prefect"), "deployment", "run", "synth/reference", "--watch"]
        + ["--param", f"params={json.dumps(attack['params'])}"],
        env=stack["env"],
        cwd=folder,
        capture_output=True,
        text=True,
        timeout=240,
    )
    # refused by the server when the run is created: the parameters do not validate
    refusal = done.stdout + done.stderr
    assert "'server_command' was unexpected" in refusal, refusal
    assert not marker.exists()
    runs = _post_as_user(stack, "/flow_runs/filter", {})
    assert all(r["parameters"].get("params") != attack["params"] for r in runs)
    # the UI still works for the user: it asks for the auth string and uses CSRF tokens
    page = httpx.get(ui + "/", timeout=30)
    assert page.status_code == 200 and "<html" in page.text.lower()
    settings = httpx.get(ui + "/ui-settings", timeout=30).json()
    assert settings["auth"] == "BASIC" and settings["csrf_enabled"] is True


def _post_as_user(stack: dict, path: str, body: dict) -> list[dict]:
    """A POST the way Prefect's own clients send it: the auth string and a CSRF token."""
    api, folder = stack["api"], stack["folder"]
    auth_string = subprocess.run(
        [str(BIN / "flywheel"), "server", "auth-string"],
        env=stack["env"],
        cwd=folder,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    auth = tuple(auth_string.split(":", 1))
    token = httpx.get(f"{api}/csrf-token", params={"client": "test"}, auth=auth, timeout=30)
    headers = {"Prefect-Csrf-Token": token.json()["token"], "Prefect-Csrf-Client": "test"}
    return httpx.post(f"{api}{path}", json=body, auth=auth, headers=headers, timeout=30).json()
