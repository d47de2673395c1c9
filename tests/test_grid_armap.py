"""ARMAP on a second environment (the grid walk): the protocol, the planners' mechanics
with a scripted policy, and intents -> trajectories -> refined intents -> triplets ->
reward model -> every planner with a real tiny model as the agent."""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from flywheel.environments.grid import (
    MAX_STEPS,
    START,
    Goal,
    GridEnvironment,
    expert_examples,
    held_out_tasks,
    train_grid_agent,
)
from flywheel.llm import BackendSpec
from flywheel.synthesis.armap import (
    ArmapConfig,
    LLMIntentProposer,
    make_triplets,
    synthesize_triplets,
)
from flywheel.synthesis.environment import Agent, Episode, TaskParseError, reward_prompt
from flywheel.synthesis.planners import best_of_n, evaluate, mcts, plain, reflexion
from flywheel.world.models import ALPHABET
from tests.helpers.scripted import ScriptedBackend

GRID = GridEnvironment()


def test_a_walk_is_scored_refined_and_replayed() -> None:
    goal = Goal(4, 1)
    episode = Episode.start(GRID, goal)
    assert episode.prompt() == "task: go to 4 1\nat 2 2 moves up down left right\naction: "
    for action in ("right", "right", "jump", "down", "stop"):
        episode.apply(action)
    assert episode.done and episode.steps == 5 and episode.reward == 1.0
    assert episode.trajectory_text() == "right>right>noop>down>stop|stopped at 4 1"
    assert episode.env.refine(random.Random(0)) == goal
    assert episode.env.score(Goal(0, 0)) == pytest.approx(1 - 5 / 8)
    assert episode.env.feedback() == "4 1"
    again = Episode.replay(GRID, goal, episode.actions)
    assert again.trajectory_text() == episode.trajectory_text() and again.reward == 1.0
    # never stopped: no score, nothing fulfilled, no feedback
    lost = Episode.replay(GRID, goal, ["up"] * MAX_STEPS)
    assert lost.done and lost.reward == 0.0 and lost.env.refine(random.Random(0)) is None
    assert lost.env.feedback() is None
    # feedback is shown to the retry
    retry = Episode.start(GRID, goal, feedback=["4 1"])
    assert retry.prompt().endswith("avoid 4 1\naction: ")


def test_tasks_parse_with_clear_errors() -> None:
    assert GRID.parse_task("go to 3 4") == Goal(3, 4) == GRID.parse_task(" 3 4")
    assert GRID.parse_task(GRID.task_text(Goal(0, 4))) == Goal(0, 4)
    with pytest.raises(TaskParseError, match="outside the 5x5 grid"):
        GRID.parse_task("go to 7 2")
    wall = GRID.walls[0]
    with pytest.raises(TaskParseError, match=f"cell {wall[0]} {wall[1]} is a wall"):
        GRID.parse_task(f"go to {wall[0]} {wall[1]}")
    with pytest.raises(TaskParseError, match="no 'go to <x> <y>'"):
        GRID.parse_task("walk somewhere")
    with pytest.raises(ValueError, match="start cell"):
        GridEnvironment(walls=[START])
    rng = random.Random(0)
    assert all(GRID.sample_task(rng).cell not in GRID.walls for _ in range(50))
    assert GRID.task_prompt(random.Random(0), 3).startswith("grid 5x5, open cells: ")
    # the expert's prompts and reward texts fit the char models
    sample, alphabet = expert_examples(), set(ALPHABET)
    for _ in range(200):
        prompt, action = sample(rng)
        assert set(prompt + action) <= alphabet and len(prompt) + 30 < 256


class StopsLater:
    """A reward model that likes longer walks: it sees only the text, as a real one."""

    def score(self, prompts: Sequence[str], completions: Sequence[str]) -> list[float]:
        assert all(p.startswith("task: go to ") for p in prompts)
        return [c.split("|")[0].count(">") / MAX_STEPS for c in completions]


def test_planner_mechanics_with_a_scripted_policy() -> None:
    tasks = [Goal(4, 2), Goal(2, 4)]
    agent = Agent(ScriptedBackend(["right", "stop", "up", "up", "stop", "left"]))
    for planner, episodes in ((plain(), 1), (best_of_n(3), 3), (mcts(3, expand_k=2), 3)):
        results = planner.run(agent, StopsLater(), tasks, GRID, seed=0)
        assert [r.intent for r in results] == tasks
        for r, task in zip(results, tasks, strict=True):
            replayed = Episode.replay(GRID, task, r.actions)
            assert r.reward == replayed.reward and r.trajectory == replayed.trajectory_text()
            assert r.episodes <= episodes and r.as_dict()["intent"] == GRID.task_text(task)
    # best-of-n executes a walk the reward model scored, and reports that score
    best = best_of_n(3).run(agent, StopsLater(), tasks, GRID, seed=0)
    assert all(r.score == StopsLater().score(["task: go to 0 0"], [r.trajectory])[0] for r in best)
    # reflexion's retries carry the cell a failed attempt stopped at
    backend = ScriptedBackend(["stop"])
    tried = reflexion(trials=2, threshold=1.0).run(Agent(backend), StopsLater(), tasks, GRID)
    assert all(r.episodes == 2 for r in tried)
    assert any(p.endswith("avoid 2 2\naction: ") for p in backend.prompts)


@pytest.fixture(scope="module")
def grid_agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Agent]:
    """A tiny char Llama trained 80 steps on the grid expert: it walks, badly."""
    from flywheel.llm import TransformersBackend

    path = train_grid_agent(tmp_path_factory.mktemp("grid") / "agent", steps=80, batch_size=8)
    with TransformersBackend(path, batch_size=64) as backend:
        yield Agent(backend, temperature=1.0)


def test_armap_end_to_end_on_the_grid(grid_agent: Agent, tmp_path: Path) -> None:
    from flywheel.reward_models.bradley_terry import (
        RewardModel,
        RewardTrainingConfig,
        train_reward_model,
    )
    from flywheel.world.models import new_tiny_model, save_tiny

    config = ArmapConfig(intents=12, trajectories_per_intent=4, chunk_size=4, max_steps=MAX_STEPS)
    triplets, failures, figures = synthesize_triplets(config, None, grid_agent, environment=GRID)
    assert failures == [] and figures["episodes"] == 48 and figures["intents"] == 12
    assert 0 < figures["bought_rate"] <= 1 and len(triplets) == figures["triplets"] > 0
    assert len({t["id"] for t in triplets}) == len(triplets)
    for t in triplets:
        refined = GRID.parse_task(t["intent"])
        assert t["chosen"].endswith(f"|stopped at {refined.x} {refined.y}")
        assert t["positive_score"] == 1.0 > t["negative_score"] >= 0.0
        assert t["prompt"] == reward_prompt(t["intent"]) and t["chosen"] != t["rejected"]
    # the refinement on replayed episodes gives the same rows
    episodes = grid_agent.rollout([Goal(4, 2)] * 4, GRID, seed=3)
    rows = make_triplets(0, Goal(4, 2), episodes, [], random.Random(0), negatives_per_positive=4)
    assert all(r["original_intent"] == "go to 4 2" for r in rows)

    # an LLM proposer over the grid: whatever the tiny model writes is kept, never dropped
    llm = config.model_copy(update={"proposer": "llm", "intents": 4})
    _, failed, figures = synthesize_triplets(
        llm, LLMIntentProposer(grid_agent.backend), grid_agent, environment=GRID
    )
    assert figures["intent_failures"] == len(failed)
    assert all(f["error"] and f["prompt"].startswith("grid 5x5") for f in failed)

    backbone = save_tiny(new_tiny_model("small"), tmp_path / "backbone")
    rm_config = RewardTrainingConfig(base_model=str(backbone), max_length=256, batch_size=16)
    report = train_reward_model(triplets, triplets[:8], rm_config, tmp_path / "rm")
    assert report["train_rows"]["kept"] == len(triplets)
    reward_model = RewardModel(tmp_path / "rm")

    environment, tasks = held_out_tasks(4)
    budgets = [
        (plain(), 1, 0),
        (best_of_n(3), 3, 3),
        (reflexion(trials=2, threshold=10.0), 2, 2),
        (mcts(simulations=3, expand_k=2), 3, 3),
    ]
    for planner, episodes, rm_calls in budgets:
        figures = evaluate(planner, grid_agent, reward_model, tasks, environment, keep_results=True)
        assert figures["intents"] == 4 and len(figures["results"]) == 4
        assert 0.0 <= figures["success_rate"] <= figures["mean_reward"] <= 1.0
        for row in figures["results"]:
            assert row["intent"].startswith("go to ") and 1 <= row["episodes"] <= episodes
            assert row["rm_calls"] <= rm_calls and len(row["actions"]) <= MAX_STEPS
            assert (row["score"] is None) == (planner.name == "plain")


def test_the_flows_choose_environments_from_a_fixed_registry() -> None:
    from typing import get_args

    from pydantic import ValidationError

    from flywheel.flows.armap import ArmapSynthParams
    from flywheel.flows.environments import ENVIRONMENTS, EnvironmentName
    from flywheel.flows.plan import MCTSParams

    assert set(ENVIRONMENTS) == set(get_args(EnvironmentName)) == {"shop", "grid"}
    for name, entry in ENVIRONMENTS.items():
        built = entry.build(ArmapSynthParams())
        environment, tasks = entry.held_out(3)
        assert built.name == environment.name == name and len(tasks) == 3
        assert built.parse_task(built.task_text(tasks[0])) == tasks[0]
    assert ArmapSynthParams().environment == "shop"
    with pytest.raises(ValidationError, match="environment"):
        ArmapSynthParams(environment="flywheel.world.shop:ShopEnv")
    assert MCTSParams(environment="grid").environment == "grid"


def test_the_shops_settings_are_part_of_the_synthesis_checkpoint() -> None:
    # another catalog is another synthesis: its run must not resume an earlier catalog's
    from flywheel.flows.armap import ArmapSynthParams, _workdir

    agent = BackendSpec(kind="openai", model="some-agent", base_url="http://127.0.0.1:9/v1")
    base = ArmapSynthParams(agent=agent)
    assert _workdir(base) == _workdir(ArmapSynthParams(agent=agent))
    for change in ({"catalog_seed": 7}, {"catalog_size": 60}, {"price_slack": 3}):
        assert _workdir(base) != _workdir(ArmapSynthParams(agent=agent, **change)), change
