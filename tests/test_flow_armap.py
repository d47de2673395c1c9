"""`synth/armap` and the planner flows under a real Prefect server: triplets, failures,
the reward model trained on them with lineage, planners against the plain policy."""

from __future__ import annotations

from pathlib import Path

import pytest

from flywheel.flows.armap import (
    ArmapSynthParams,
    BestOfNParams,
    MCTSParams,
    ReflexionParams,
    armap,
    best_of_n,
    mcts,
    reflexion,
)
from flywheel.llm import BackendSpec, ModelNotFound
from flywheel.store import ModelNotRegistered, read_dataset, read_model, sql


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
    out = armap(params)
    triplets = read_dataset("armap_triplets")
    assert triplets.num_rows == out["figures"]["triplets"] > 0
    rows = triplets.to_pandas()
    assert (rows.positive_score == 1.0).all() and (rows.negative_score < 1.0).all()
    assert read_dataset("armap_triplets__failed").num_rows == 0

    rm = read_model("armap-triplets-rm")
    assert out["reward_model"]["version"] == rm.version
    lineage = sql(
        "select input_dataset, input_kind, kind from lineage "
        "where dataset in ('armap_triplets', 'armap-triplets-rm') order by kind"
    ).values.tolist()
    assert lineage == [["shop-agent", "model", "dataset"], ["armap_triplets", "dataset", "model"]]

    # a repeated run reuses the checkpointed work and the versions written
    again = armap(params)
    assert again["triplets"] == out["triplets"] and again["reused_earlier_output"]

    common = dict(agent=agent(world_models), intents=12)
    for flow_fn, flow_params in (
        (best_of_n, BestOfNParams(n=3, **common)),
        (reflexion, ReflexionParams(trials=2, **common)),
        (mcts, MCTSParams(simulations=3, expand_k=2, **common)),
    ):
        result = flow_fn(flow_params)
        assert result["planner"]["intents"] == 12 == result["plain"]["intents"]
        # the planner spends more than the plain policy's single episode
        assert result["planner"]["mean_env_steps"] > result["plain"]["mean_env_steps"] * 0.99
        assert read_dataset(result["dataset"].split("@")[0]).num_rows == 12
    flows = sql("select flow, status from runs order by started")
    assert set(flows.status) == {"completed"}
    assert {"synth/armap", "reward/train", "plan/mcts"} <= set(flows.flow)


def test_bad_inputs_fail_before_work(prefect_api, world_models, data_dir):
    with pytest.raises(ModelNotFound):
        armap(ArmapSynthParams(agent=BackendSpec(model=str(world_models / "nope"))))
    with pytest.raises(ValueError, match="proposer_backend: required"):
        armap(ArmapSynthParams(agent=agent(world_models), proposer="llm"))
    with pytest.raises(FileNotFoundError, match="reward_base_model: no model folder"):
        armap(ArmapSynthParams(agent=agent(world_models), reward_base_model="/nowhere"))
    with pytest.raises(ModelNotRegistered, match="no registered model 'armap-triplets-rm'"):
        best_of_n(BestOfNParams(agent=agent(world_models), intents=2))
    with pytest.raises(ValueError, match="intents"):
        ArmapSynthParams(intents=0)
