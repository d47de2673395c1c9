import random
from collections.abc import Iterator, Sequence

import pytest

from flywheel.synthesis.environment import Episode as EnvEpisode
from flywheel.synthesis.planners import (
    PlanResult,
    best_of_n,
    evaluate,
    mcts,
    plain,
    reflexion,
    reward_scores,
)
from flywheel.world.shop import MAX_STEPS, Intent, make_catalog, sample_intent
from flywheel.world.shop_agent import Episode, parse_listing
from flywheel.world.shop_env import (
    EnvScoreOracle,
    ShopAgent,
    ShopEnvironment,
    reward_prompt,
    trajectory_text,
)

CATALOG = make_catalog(120, seed=11)
SHOP = ShopEnvironment(CATALOG)
INTENTS = [sample_intent(CATALOG, random.Random(k)) for k in range(24)]


@pytest.fixture(scope="module")
def agent(world_models) -> Iterator[ShopAgent]:
    """The session's shop agent (600 steps): a poor policy, so planning has room to help."""
    from flywheel.llm import TransformersBackend

    with TransformersBackend(world_models / "shop-agent", batch_size=128) as backend:
        yield ShopAgent(backend, temperature=1.0)


def check_result(result: PlanResult, intent: Intent) -> None:
    """What every planner reports about what it executed."""
    episode = Episode.replay(CATALOG, intent, result.actions)
    assert result.intent == intent
    assert result.reward == episode.reward
    assert result.reward == (intent.score(episode.bought) if episode.bought else 0.0)
    assert result.success == (result.reward == 1.0)
    assert result.trajectory == trajectory_text(episode)


def test_oracle_scores_the_env_reward() -> None:
    oracle = EnvScoreOracle()
    intent = INTENTS[0]
    match = next(i for i in CATALOG if intent.score(i) == 1.0)
    episode = Episode.start(CATALOG, intent)
    episode.apply(f"search[{match.size} {match.color} {match.category}]")
    listed = [item.id for item in parse_listing(episode.env.observation())]
    episode.apply(f"click[{listed.index(match.id) + 1}]")
    episode.apply("buy")
    assert episode.reward == 1.0
    nothing = Episode.replay(CATALOG, intent, ["back"] * MAX_STEPS)
    played = [EnvEpisode.replay(SHOP, intent, e.actions) for e in (episode, nothing)]
    assert reward_scores(oracle, played) == [1.0, 0.0]
    # an ensemble's dict is read by its mean
    ensemble = type("E", (), {"score": lambda self, p, c: {"mean": [0.5] * len(p)}})()
    assert reward_scores(ensemble, played[:1]) == [0.5]
    with pytest.raises(ValueError, match="not a shop reward prompt"):
        oracle.score(["hello"], ["|bought nothing"])
    assert reward_prompt(intent).startswith("task: ")


def test_planners_stay_within_budget(agent: ShopAgent) -> None:
    oracle = EnvScoreOracle()
    budgets = [
        (plain(), 1, 0),
        (best_of_n(4), 4, 4),
        (reflexion(trials=3, threshold=1.0), 3, 3),
        (mcts(simulations=4, expand_k=2, horizon=8), 4, 4),
    ]
    for planner, episodes, rm_calls in budgets:
        results = planner.run(agent, oracle, INTENTS[:8], SHOP, seed=0)
        assert len(results) == 8
        for result, intent in zip(results, INTENTS[:8], strict=True):
            check_result(result, intent)
            assert 1 <= result.episodes <= episodes and result.rm_calls <= rm_calls
            assert result.env_steps <= result.episodes * 2 * MAX_STEPS
            assert result.model_calls >= len(result.actions) > 0
            if planner.name != "plain":  # the executed trajectory is the one it scored
                assert result.score == result.reward
        if planner.name == "best_of_n":
            assert all(r.episodes == 4 and r.env_steps <= 4 * MAX_STEPS for r in results)
        if planner.name == "mcts":
            assert all(len(r.actions) <= 8 for r in results)


def test_best_of_n_with_an_oracle_beats_the_sampled_policy(agent: ShopAgent) -> None:
    figures = {}
    for planner in (plain(), best_of_n(6)):
        figures[planner.name] = [
            evaluate(planner, agent, EnvScoreOracle(), INTENTS, SHOP, seed=seed) for seed in (0, 1)
        ]
    for base, bon in zip(figures["plain"], figures["best_of_n"], strict=True):
        assert bon["mean_reward"] >= base["mean_reward"]
        assert bon["mean_episodes"] == 6 and base["mean_episodes"] == 1
        assert bon["mean_model_calls"] > base["mean_model_calls"]
    assert sum(f["mean_reward"] for f in figures["best_of_n"]) > sum(
        f["mean_reward"] for f in figures["plain"]
    )


class Constant:
    """A reward model that likes everything the same."""

    def __init__(self, value: float) -> None:
        self.value = value
        self.calls = 0

    def score(self, prompts: Sequence[str], completions: Sequence[str]) -> list[float]:
        self.calls += len(prompts)
        return [self.value] * len(prompts)


def test_reflexion_stops_when_the_reward_model_is_satisfied(agent: ShopAgent) -> None:
    intents = INTENTS[:6]
    happy = reflexion(trials=3, threshold=0.0).run(agent, Constant(1.0), intents, SHOP)
    assert all(r.episodes == 1 for r in happy)
    unhappy = Constant(-1.0)
    retried = reflexion(trials=3, threshold=0.0).run(agent, unhappy, intents, SHOP)
    assert all(r.episodes == 3 and r.rm_calls == 3 for r in retried) and unhappy.calls == 18
    # never satisfied: the best-scored attempt is executed, so with the oracle it is the max
    best = reflexion(trials=3, threshold=2.0).run(agent, EnvScoreOracle(), intents, SHOP)
    assert all(r.score == r.reward for r in best)


def test_planner_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="n must be"):
        best_of_n(0)
    with pytest.raises(ValueError, match="trials"):
        reflexion(trials=0)
    with pytest.raises(ValueError, match="horizon"):
        mcts(horizon=MAX_STEPS + 1)
    with pytest.raises(ValueError, match="expand_k"):
        mcts(expand_k=0)
    with pytest.raises(ValueError, match="intents is empty"):
        evaluate(plain(), None, None, [], SHOP)  # type: ignore[arg-type]


def test_evaluate_reports_rates(agent: ShopAgent) -> None:
    figures = evaluate(
        mcts(simulations=3, expand_k=2),
        agent,
        EnvScoreOracle(),
        INTENTS[:5],
        SHOP,
        keep_results=True,
    )
    assert figures["intents"] == 5 and len(figures["results"]) == 5
    # a success is a reward of 1, so the success rate never exceeds the mean reward
    assert 0.0 <= figures["success_rate"] <= figures["mean_reward"] <= 1.0
    assert figures["mean_rm_calls"] <= 3 and figures["budget"]["simulations"] == 3
