"""`synth/armap` and the planner flows under a real Prefect server: triplets, failures,
the reward model trained on them with lineage, planners against the plain policy."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flywheel.flows.armap import ArmapSynthParams, armap_flow
from flywheel.flows.plan import (
    BestOfNParams,
    MCTSParams,
    ReflexionParams,
    best_of_n_flow,
    mcts_flow,
    reflexion_flow,
)
from flywheel.llm import BackendSpec, ModelNotFound, make_backend
from flywheel.store import Checkpoint, ModelNotRegistered, read_dataset, read_model, sql
from flywheel.synthesis.armap import ArmapConfig, synthesize_triplets
from flywheel.world.shop_env import ShopAgent, ShopEnvironment


def agent(world_models: Path) -> BackendSpec:
    return BackendSpec(model=str(world_models / "shop-agent"))


def test_armap_then_planners(prefect_api, world_models, data_dir):
    params = ArmapSynthParams(
        agent=agent(world_models),
        reward_base_model=str(world_models / "world-small"),
        intents=24,
        trajectories_per_intent=4,
        chunk_size=8,
    )
    out = armap_flow(params)
    triplets = read_dataset("armap_triplets")
    assert triplets.num_rows == out["figures"]["triplets"] > 0
    rows = triplets.to_pandas()
    assert (rows.positive_score == 1.0).all() and (rows.negative_score < 1.0).all()
    assert read_dataset("armap_triplets__failed").num_rows == 0

    rm = read_model("armap-triplets-rm")
    assert out["reward_model"]["version"] == rm.version
    lineage = sql(
        "select input_dataset, input_kind, kind from lineage "
        "where dataset in ('armap_triplets', 'armap-triplets-rm') order by kind, input_dataset"
    ).values.tolist()
    # the reward model: from the triplets, on the world-small backbone
    assert lineage == [
        ["shop-agent", "model", "dataset"],
        ["armap_triplets", "dataset", "model"],
        ["world-small", "model", "model"],
    ]

    # a repeated run reuses the checkpointed work and the versions written
    again = armap_flow(params)
    assert again["triplets"] == out["triplets"] and again["reused_earlier_output"]

    common = dict(agent=agent(world_models), intents=12)
    for flow_fn, flow_params in (
        (best_of_n_flow, BestOfNParams(n=3, **common)),
        (reflexion_flow, ReflexionParams(trials=2, **common)),
        (mcts_flow, MCTSParams(simulations=3, expand_k=2, **common)),
    ):
        result = flow_fn(flow_params)
        assert result["planner"]["intents"] == 12 == result["plain"]["intents"]
        # the plain policy plays one episode per intent; best-of-n and MCTS play more, and
        # reflexion retries only an attempt its reward model scores below the threshold
        # (so its one episode may be shorter than the plain one: not a cost comparison)
        assert result["plain"]["mean_episodes"] == 1 <= result["planner"]["mean_episodes"]
        if flow_fn is not reflexion_flow:
            assert result["planner"]["mean_episodes"] > 1
            assert result["planner"]["mean_env_steps"] > result["plain"]["mean_env_steps"]
        assert read_dataset(result["dataset"].split("@")[0]).num_rows == 12
    flows = sql("select flow, status from runs order by started")
    assert set(flows.status) == {"completed"}
    assert {"synth/armap", "reward/train", "plan/mcts"} <= set(flows.flow)


def test_bad_inputs_fail_before_work(prefect_api, world_models, data_dir):
    with pytest.raises(ModelNotFound):
        armap_flow(ArmapSynthParams(agent=BackendSpec(model=str(world_models / "nope"))))
    with pytest.raises(ValueError, match="proposer_backend: required"):
        armap_flow(ArmapSynthParams(agent=agent(world_models), proposer="llm"))
    with pytest.raises(FileNotFoundError, match="reward_base_model: no model folder"):
        armap_flow(ArmapSynthParams(agent=agent(world_models), reward_base_model="/nowhere"))
    with pytest.raises(ModelNotRegistered, match="no registered model 'armap-triplets-rm'"):
        best_of_n_flow(BestOfNParams(agent=agent(world_models), intents=2))
    with pytest.raises(ValueError, match="intents"):
        ArmapSynthParams(intents=0)


KILL_SCRIPT = """
import json, sys
from flywheel.flows.armap import ArmapSynthParams, armap_flow
armap_flow(ArmapSynthParams.model_validate(json.loads(sys.argv[1])))
"""


def test_armap_killed_halfway_resumes_without_losing_or_duplicating_rows(
    prefect_api, world_models, data_dir, tmp_path
):
    params = ArmapSynthParams(
        agent=agent(world_models),
        intents=64,
        trajectories_per_intent=4,
        chunk_size=4,
        train_reward_model=False,
    )
    env = {**os.environ, "PREFECT_API_URL": prefect_api, "FLYWHEEL_DATA_DIR": str(data_dir)}
    proc = subprocess.Popen(
        [sys.executable, "-c", KILL_SCRIPT, params.model_dump_json()],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 180
    chunks: list[Path] = []
    while time.monotonic() < deadline and proc.poll() is None:
        chunks = list((data_dir / "_work" / "armap").glob("*/armap-triplets-*/chunk-*.json"))
        if len(chunks) >= 4:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    stage = chunks[0].parent
    assert not (stage / "_done.json").exists(), "run finished before the kill"

    out = armap_flow(params)  # same parameters: resumes from the checkpoint
    rows = read_dataset("armap_triplets").to_pandas()
    assert len(rows) == out["figures"]["triplets"] == rows["id"].nunique()

    # the same synthesis, never interrupted, in a separate checkpoint folder
    config = ArmapConfig.model_validate(params.model_dump(include=set(ArmapConfig.model_fields)))
    with make_backend(params.agent) as backend:
        clean = ShopAgent(backend, temperature=config.temperature, seed=config.seed)
        shop = ShopEnvironment.from_settings(
            params.catalog_size, params.catalog_seed, params.price_slack
        )
        expected, _, _ = synthesize_triplets(
            config, None, clean, Checkpoint(tmp_path / "clean"), environment=shop
        )
    assert sorted(rows["id"]) == sorted(t["id"] for t in expected)
    by_id = rows.set_index("id")
    assert all(by_id.loc[t["id"], "chosen"] == t["chosen"] for t in expected)
    assert all(by_id.loc[t["id"], "rejected"] == t["rejected"] for t in expected)
