"""`synth/armap` with an LLM proposing the intents (proposer 'llm'): the run writes its
triplets and the proposals that did not parse with their raw text, and both datasets'
lineage names the proposer beside the agent. A proposer is refused at validation when
proposer 'llm' names none."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from flywheel.flows.armap import ArmapSynthParams, armap_flow
from flywheel.llm import BackendSpec
from flywheel.store import read_dataset, sql


def test_llm_proposer_run_keeps_failed_proposals_and_names_the_proposer(
    prefect_api, world_models, data_dir
):
    params = ArmapSynthParams(
        agent=BackendSpec(model=str(world_models / "shop-agent")),
        proposer="llm",
        proposer_backend=BackendSpec(model=str(world_models / "world-small")),
        intents=3,
        trajectories_per_intent=2,
        chunk_size=3,
        train_reward_model=False,
    )
    out = armap_flow(params)
    failed = read_dataset("armap_triplets__failed").to_pandas()
    assert len(failed) == out["figures"]["intent_failures"] > 0  # world-small knows no shop
    assert failed.raw.notna().all() and (failed.error != "").all()
    assert read_dataset("armap_triplets").num_rows == out["figures"]["triplets"]
    for dataset in ("armap_triplets", "armap_triplets__failed"):
        inputs = sql(f"select input_dataset from lineage where dataset = '{dataset}'")
        assert sorted(inputs.input_dataset) == ["shop-agent", "world-small"]
    runs = sql("select status from runs")
    assert runs.status.tolist() == ["completed"]


def test_llm_proposer_without_a_backend_is_refused_by_name() -> None:
    with pytest.raises(ValidationError, match="proposer_backend: required when proposer is 'llm'"):
        ArmapSynthParams(proposer="llm")
