import random
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydantic import ValidationError

from flywheel.store import Checkpoint
from flywheel.synthesis.armap import (
    ArmapConfig,
    LLMIntentProposer,
    WorldIntentProposer,
    make_triplets,
    synthesize_triplets,
)
from flywheel.synthesis.environment import Episode as EnvEpisode
from flywheel.world.models import ALPHABET
from flywheel.world.shop import MAX_STEPS, make_catalog, sample_intent
from flywheel.world.shop_agent import (
    ACTION_LIMIT,
    Episode,
    agent_prompt,
    expert_episode,
    random_avoid,
)
from flywheel.world.shop_env import (
    ShopAgent,
    ShopEnvironment,
    parse_intent,
    reward_prompt,
    trajectory_text,
)
from tests.helpers.scripted import ScriptedBackend

POSITIONS = 256  # max_position_embeddings of the tiny models


def shop() -> ShopEnvironment:
    return ShopEnvironment.from_settings()  # 120 items, catalog seed 0, price slack 15


def as_env_episode(episode: Episode) -> EnvEpisode:
    """A shop agent's episode as the environment-generic one (replayed: same state)."""
    environment = ShopEnvironment(episode.env.catalog)
    return EnvEpisode.replay(environment, episode.intent, episode.actions, episode.avoid)


@pytest.fixture(scope="module")
def agent_dir(world_models) -> Path:
    """The session's shop agent (600 steps): it acts, badly, but it buys things."""
    return world_models / "shop-agent"


@pytest.fixture(scope="module")
def agent(agent_dir: Path) -> Iterator[ShopAgent]:
    from flywheel.llm import TransformersBackend

    with TransformersBackend(agent_dir, batch_size=128) as backend:
        yield ShopAgent(backend, temperature=1.0)


def expert_episodes(n: int, seed: int = 0) -> list[Episode]:
    catalog = make_catalog(120, seed=seed)
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        intent = sample_intent(catalog, rng)
        avoid = random_avoid(catalog, intent, rng) if rng.random() < 0.5 else ()
        out.append(expert_episode(catalog, intent, rng, avoid)[0])
    return out


def test_prompts_and_reward_texts_fit_the_tiny_models() -> None:
    alphabet = set(ALPHABET)
    longest = 0
    for episode in expert_episodes(300):
        replay = Episode.start(episode.env.catalog, episode.intent, episode.avoid)
        for action in episode.actions:
            prompt = replay.prompt()
            assert set(prompt) <= alphabet, prompt  # no `$`, no `;`
            assert len(prompt) + ACTION_LIMIT + 1 <= POSITIONS
            longest = max(longest, len(prompt) + len(action) + 1)
            replay.apply(action)
        text = reward_prompt(episode.intent) + trajectory_text(episode)
        assert set(text) <= alphabet and len(text) + 1 <= POSITIONS
    assert longest <= 230
    # the env's own intent text works too, and the observation loses its hints
    prompt = agent_prompt("buy a small red mug under $30", "shop home. task: x. actions: search[w]")
    assert prompt == "task: small red mug under 30\nhome\naction: "


def test_replaying_actions_recreates_the_episode() -> None:
    for episode in expert_episodes(20, seed=3):
        again = Episode.replay(episode.env.catalog, episode.intent, episode.actions, episode.avoid)
        assert again.env.observation() == episode.env.observation()
        assert (again.reward, again.bought, again.steps) == (
            episode.reward,
            episode.bought,
            episode.steps,
        )
        assert trajectory_text(again) == trajectory_text(episode)


def test_avoided_items_are_marked_in_the_prompt() -> None:
    catalog = make_catalog(120, seed=0)
    intent = sample_intent(catalog, random.Random(0))
    episode = Episode.start(catalog, intent)
    episode.apply(f"search[{intent.size} {intent.color} {intent.category}]")
    first = episode.env.observation().split(": ", 1)[1].split()[0]
    assert "1 avoid" not in episode.prompt()
    retry = Episode.replay(catalog, intent, episode.actions, avoid=[first])
    assert "results 1 avoid," in retry.prompt()


def test_config_errors_name_the_field() -> None:
    for field, value in (("intents", 0), ("trajectories_per_intent", 1), ("max_steps", 11)):
        with pytest.raises(ValidationError, match=field):
            ArmapConfig(**{field: value})
    with pytest.raises(ValidationError, match="proposer"):
        ArmapConfig(proposer="human")


def test_refinement_makes_each_positive_exact_and_negatives_lower() -> None:
    episodes = expert_episodes(8, seed=5)
    original = episodes[0].intent
    rows = make_triplets(
        0,
        original,
        [as_env_episode(e) for e in episodes],
        [],
        random.Random(0),
        negatives_per_positive=8,
    )
    assert rows
    for row in rows:
        refined = parse_intent("buy a " + row["intent"])
        positive = next(e for e in episodes if trajectory_text(e) == row["chosen"])
        assert refined.score(positive.bought) == 1.0 == row["positive_score"]
        assert row["positive_score"] > row["negative_score"]
        assert refined.max_price >= positive.bought.price
        assert row["prompt"] == reward_prompt(refined) and row["rejected"] == row["negative"]


def test_synthesis_with_the_tiny_agent(agent: ShopAgent) -> None:
    config = ArmapConfig(intents=12, trajectories_per_intent=4, chunk_size=4, seed=1)
    triplets, failures, figures = synthesize_triplets(config, None, agent, environment=shop())
    assert failures == [] and figures["episodes"] == 48
    assert figures["bought_rate"] > 0 and len(triplets) == figures["triplets"] > 0
    assert len({t["id"] for t in triplets}) == len(triplets)
    from flywheel.world.shop_env import EnvScoreOracle

    oracle = EnvScoreOracle()
    chosen = oracle.score([t["prompt"] for t in triplets], [t["chosen"] for t in triplets])
    rejected = oracle.score([t["prompt"] for t in triplets], [t["rejected"] for t in triplets])
    assert all(c == 1.0 for c in chosen)
    assert all(r == t["negative_score"] < 1.0 for r, t in zip(rejected, triplets, strict=True))
    # the same seed gives the same rows
    again, _, _ = synthesize_triplets(config, WorldIntentProposer(), agent, environment=shop())
    assert again == triplets


def test_llm_proposer_failures_keep_raw_text(agent: ShopAgent) -> None:
    answers = [
        "buy a small red mug under $30",
        "large blue hat under 12",  # the prompt ends in "task: ", so this parses too
        "i would buy a nice lamp",
        "buy a tiny red mug under 30",
        "",
    ]
    proposer = LLMIntentProposer(ScriptedBackend(answers))
    config = ArmapConfig(intents=5, trajectories_per_intent=2, proposer="llm")
    triplets, failures, figures = synthesize_triplets(config, proposer, agent, environment=shop())
    assert [f["index"] for f in failures] == [2, 3, 4] and figures["intent_failures"] == 3
    assert [f["raw"] for f in failures] == answers[2:]
    assert "unknown size 'tiny'" in failures[1]["error"]
    assert all(f["error"] and f["prompt"].startswith("shop items: ") for f in failures)
    assert {t["original_intent"] for t in triplets} <= {
        "small red mug under 30",
        "large blue hat under 12",
    }
    with pytest.raises(ValueError, match="proposer"):
        synthesize_triplets(
            config.model_copy(update={"proposer": "world"}),
            proposer,
            agent,
            environment=shop(),
        )
    with pytest.raises(ValueError, match="proposer"):
        synthesize_triplets(config, None, agent, environment=shop())
    # a real tiny model as the intent writer: whatever it writes is kept, never dropped
    rows = LLMIntentProposer(agent.backend).propose(
        ShopEnvironment(make_catalog(120)), [0, 1, 2], seed=0
    )
    assert all((r["intent"] is None) == bool(r["error"]) for r in rows)
    assert all(r["intent"] is not None or isinstance(r["raw"], str) for r in rows)


def test_killed_synthesis_resumes_with_identical_rows(agent: ShopAgent, tmp_path: Path) -> None:
    config = ArmapConfig(intents=9, trajectories_per_intent=3, chunk_size=3, seed=2)
    expected = synthesize_triplets(config, None, agent, environment=shop())[0]

    class Killed(RuntimeError):
        pass

    class DiesAfterOneChunk(ShopAgent):
        def rollout(self, *args, **kwargs):
            if self.calls == 1:
                raise Killed
            self.calls += 1
            return super().rollout(*args, **kwargs)

    dying = DiesAfterOneChunk(agent.backend, temperature=1.0)
    dying.calls = 0
    checkpoint = Checkpoint(tmp_path / "ckpt")
    with pytest.raises(Killed):
        synthesize_triplets(config, None, dying, checkpoint, environment=shop())
    resumed, _, _ = synthesize_triplets(config, None, agent, checkpoint, environment=shop())
    assert resumed == expected
    assert len({t["id"] for t in resumed}) == len(resumed)


def test_reward_model_trains_on_triplets(agent: ShopAgent, tmp_path: Path) -> None:
    from flywheel.reward_models.bradley_terry import (
        RewardModel,
        RewardTrainingConfig,
        train_reward_model,
    )
    from flywheel.world.models import new_tiny_model, save_tiny

    config = ArmapConfig(intents=16, trajectories_per_intent=4, seed=3)
    triplets, _, _ = synthesize_triplets(config, None, agent, environment=shop())
    backbone = save_tiny(new_tiny_model("small"), tmp_path / "backbone")
    config = RewardTrainingConfig(base_model=str(backbone), max_length=256, batch_size=16)
    report = train_reward_model(triplets, triplets[:16], config, tmp_path / "rm")
    assert report["train_rows"]["kept"] == len(triplets)
    scores = RewardModel(tmp_path / "rm").score(
        [t["prompt"] for t in triplets[:4]], [t["chosen"] for t in triplets[:4]]
    )
    assert len(scores) == 4


def test_max_steps_is_respected(agent: ShopAgent) -> None:
    catalog = make_catalog(120)
    intents = [sample_intent(catalog, random.Random(k)) for k in range(6)]
    environment = ShopEnvironment(catalog)
    episodes = agent.rollout(intents, environment, max_steps=2, seed=0)
    assert all(len(e.actions) <= 2 and e.done for e in episodes)
    assert agent.env_steps >= sum(e.steps for e in episodes)
    assert all(e.steps <= MAX_STEPS for e in agent.rollout(intents, environment, seed=1))
