"""`selectors/kmeans` scored by a registered reward model: the version read in
check-inputs is the one that scores and the one the evaluation's lineage names, also
when a newer version of that reward model is registered later."""

from __future__ import annotations

from pathlib import Path

import pytest

from flywheel.flows.reward import RewardTrainParams, train_flow
from flywheel.flows.selector_params import KmeansSelectorParams
from flywheel.flows.selectors import kmeans_selector
from flywheel.reward_models.bradley_terry import RewardModel
from flywheel.selectors.run_plan import plan_run, plan_scorer
from flywheel.store import read_dataset, read_model, sql

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    # peft calls a transformers method that transformers deprecates; nothing to act on here
    pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated"),
]
RM = "selector-scorer-rm"


def train_rm(world_models: Path, seed: int) -> str:
    out = train_flow(
        RewardTrainParams(
            base_model=str(world_models / "world-small"),
            world_pairs=60,
            epochs=1.0,
            model_name=RM,
            seed=seed,
        )
    )
    return out["model"]["version"]


def params(world_models: Path) -> KmeansSelectorParams:
    return KmeansSelectorParams(
        base_model=str(world_models / "world-small"),
        families=["reverse", "sort"],
        samples_per_task=12,
        k=2,
        per_centre=2,
        adapter_steps=4,
        selector_steps=4,
        selector="head",
        multitask_baseline=False,
        eval_tasks=40,
        scorer="reward_model",
        scorer_reward_model=RM,
    )


def test_the_planned_reward_model_scores_and_is_in_the_lineage(prefect_api, world_models, data_dir):
    first = train_rm(world_models, seed=0)
    out = kmeans_selector(params(world_models))
    assert out["figures"]["scorer"] == RM
    evaluation = read_dataset("selector_eval")
    lineage = sql(
        "select input_dataset, input_version, input_kind from lineage "
        f"where dataset = 'selector_eval' and version = '{evaluation.version}'"
    )
    assert [RM, first, "model"] in lineage.values.tolist()
    rows = evaluation.to_pandas()
    expected = RewardModel(read_model(RM, first).path).score(list(rows.prompt), list(rows.output))
    assert rows.score.tolist() == pytest.approx(expected, abs=1e-4)

    # a plan made before a newer version is registered keeps scoring with the one it read
    source = params(world_models).task_source()
    plan = plan_run(
        source,
        tasks=None,
        add=None,
        remove=None,
        need=4,
        scorer="reward_model",
        scorer_reward_model=RM,
        models=("kmeans-selector", "kmeans-adapters", "world"),
    )
    second = train_rm(world_models, seed=1)
    assert second != first and plan.scorer_model.version == first
    prompts, outputs = list(rows.prompt[:6]), list(rows.output[:6])
    scores = plan_scorer(plan, "reward_model", None)(prompts, outputs, list(rows.answer[:6]))
    newer = RewardModel(read_model(RM, second).path).score(prompts, outputs)
    assert scores == pytest.approx(expected[:6], abs=1e-4)
    assert scores != pytest.approx(newer, abs=1e-4)
