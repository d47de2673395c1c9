"""ARMAP triplet synthesis on the shop: intents, trajectories, refined intents, triplets.

After "Scaling Autonomous Agents via Automatic Reward Modeling and Planning"
(ICLR 2025). No human labels: an LLM (or the world's own sampler) proposes task
intents, the agent acts on them, and each trajectory is made a correct answer
by rewriting its intent to what it actually did. Reading top to bottom:

1. intents: `WorldIntentProposer` samples them from the catalog;
   `LLMIntentProposer` asks any Backend for `buy a <size> <color> <category>
   under <n>`. An answer that does not parse is kept as a failure with its raw
   text, the error and the prompt;
2. trajectories: `ShopAgent` samples `trajectories_per_intent` episodes per
   intent through `Backend.generate`, every episode of a chunk in lockstep
   (one batched call per step);
3. refinement: a trajectory that bought an item gets its intent rewritten to
   that item's attributes and a price bound at or above its price; on the
   refined intent it scores 1.0, so it is a positive;
4. triplets: negatives are other trajectories of the same intent that score
   lower on the refined intent (`Intent.score` of what they bought, 0 when they
   bought nothing); when there is none, one from another intent of the chunk.
   Rows carry `prompt`/`chosen`/`rejected`, so `train_reward_model` trains on
   them directly.

`synthesize_triplets` runs chunks of intents through `Checkpoint.map_chunks`:
a killed run, re-run with the same folder, gives the same rows, once each.
"""

from __future__ import annotations

import logging
import random
import re
import time
from collections.abc import Callable, Sequence
from typing import Any, Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field

from flywheel.llm import Backend
from flywheel.store import Checkpoint
from flywheel.world.shop import (
    CATEGORIES,
    COLORS,
    MAX_STEPS,
    SIZES,
    Intent,
    Item,
    make_catalog,
    sample_intent,
)
from flywheel.world.shop_agent import (
    ACTION_LIMIT,
    Episode,
    clean_text,
    intent_words,
    parse_listing,
    play,
)

log = logging.getLogger(__name__)

TRAJECTORY_LIMIT = 170  # with the reward prompt (<= 36) well inside 256 positions


class ArmapConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    intents: int = Field(200, ge=1, description="task intents to propose")
    trajectories_per_intent: int = Field(6, ge=2, description="sampled episodes per intent")
    temperature: float = Field(1.0, ge=0, description="the agent's sampling temperature")
    max_steps: int = Field(MAX_STEPS, ge=1, le=MAX_STEPS, description="steps per episode")
    catalog_size: int = Field(120, ge=5)
    catalog_seed: int = 0
    seed: int = 0
    proposer: Literal["world", "llm"] = "world"
    negatives_per_positive: int = Field(2, ge=1)
    price_slack: int = Field(15, ge=0, description="refined bound: price + randint(0, slack)")
    chunk_size: int = Field(16, ge=1, description="intents per checkpointed chunk")


# --- 1. intents ---


def intent_to_dict(intent: Intent) -> dict[str, Any]:
    return {
        "category": intent.category,
        "color": intent.color,
        "size": intent.size,
        "max_price": intent.max_price,
    }


def intent_from_dict(row: dict[str, Any]) -> Intent:
    return Intent(row["category"], row["color"], row["size"], int(row["max_price"]))


_INTENT = re.compile(r"buy an? (\w+) (\w+) (\w+) under \$?(\d+)")


class IntentParseError(ValueError):
    """An answer that is not `buy a <size> <color> <category> under <n>` over the world."""


def parse_intent(text: str) -> Intent:
    """Parse `buy a <size> <color> <category> under <n>` (a `$` before n is fine)."""
    m = _INTENT.search(text.lower())
    if m is None:
        raise IntentParseError("no 'buy a <size> <color> <category> under <price>' in the answer")
    size, color, category, price = m.groups()
    for name, value, allowed in (
        ("size", size, SIZES),
        ("color", color, COLORS),
        ("category", category, CATEGORIES),
    ):
        if value not in allowed:
            raise IntentParseError(f"unknown {name} {value!r} (the shop has {', '.join(allowed)})")
    if int(price) < 1:
        raise IntentParseError(f"price bound {price} is not positive")
    return Intent(category, color, size, int(price))


class IntentProposer(Protocol):
    """Proposes one intent per index; the same (index, seed) gives the same answer."""

    kind: str

    def describe(self) -> dict[str, Any]: ...

    def propose(self, catalog: list[Item], indices: Sequence[int], seed: int) -> list[dict]: ...


def _proposal(index: int, intent: Intent | None, **extra: Any) -> dict[str, Any]:
    return {"index": index, "intent": None if intent is None else intent_to_dict(intent), **extra}


class WorldIntentProposer:
    """The world's own sampler: an intent that some catalog item fully satisfies."""

    kind = "world"

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind}

    def propose(self, catalog: list[Item], indices: Sequence[int], seed: int) -> list[dict]:
        out = []
        for index in indices:
            intent = sample_intent(catalog, random.Random(f"{seed}-{index}"))
            out.append(_proposal(index, intent, raw=intent.text, prompt=None, error=None))
        return out


INTENT_PROMPT = (
    "shop items: {items}\n"
    "write a task to buy one of them, as: buy a (size) (color) (category) under (price)\n"
    "task: "
)


class LLMIntentProposer:
    """Any Backend writes the intents, shown a few catalog items per intent.

    Answers that do not parse become failure rows (raw text, error, prompt).
    """

    kind = "llm"

    def __init__(
        self,
        backend: Backend,
        *,
        temperature: float = 0.7,
        items_shown: int = 3,
        max_new_tokens: int = 40,
        template: str = INTENT_PROMPT,
    ) -> None:
        if items_shown < 1:
            raise ValueError(f"items_shown must be at least 1, got {items_shown}")
        self.backend = backend
        self.temperature = temperature
        self.items_shown = items_shown
        self.max_new_tokens = max_new_tokens
        self.template = template

    def describe(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "model": getattr(self.backend, "model", type(self.backend).__name__),
            "temperature": self.temperature,
            "items_shown": self.items_shown,
            "template": self.template,
        }

    def prompt(self, catalog: list[Item], index: int, seed: int) -> str:
        shown = random.Random(f"{seed}-{index}").sample(
            catalog, min(self.items_shown, len(catalog))
        )
        items = ", ".join(f"{i.id} {i.title} {i.price}" for i in shown)
        return self.template.format(items=items)

    def propose(self, catalog: list[Item], indices: Sequence[int], seed: int) -> list[dict]:
        if not indices:
            return []
        prompts = [self.prompt(catalog, index, seed) for index in indices]
        answers = self.backend.generate(
            prompts,
            max_new_tokens=self.max_new_tokens,
            temperature=self.temperature,
            stop=["\n"],
            seed=seed * 1_000_003 + indices[0],  # per chunk: a resumed chunk samples the same
        )
        out = []
        for index, prompt, answer in zip(indices, prompts, answers, strict=True):
            # the prompt ends in "task: ", so a bare "small red mug under 9" is accepted too
            text = answer if answer.lstrip().startswith("buy") else "buy a " + answer.strip()
            try:
                intent, error = parse_intent(text), None
            except IntentParseError as e:
                intent, error = None, str(e)
            out.append(_proposal(index, intent, raw=answer, prompt=prompt, error=error))
        return out


# --- 2. trajectories ---


class ShopAgent:
    """The acting policy: any Backend writes one action per step, episodes in lockstep.

    Counts what it costs: `model_calls` (actions generated), `generate_calls`
    (batched calls) and `env_steps`.
    """

    def __init__(
        self,
        backend: Backend,
        temperature: float = 1.0,
        max_new_tokens: int = ACTION_LIMIT,
        seed: int = 0,
    ) -> None:
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        self.backend = backend
        self.temperature = temperature
        self.max_new_tokens = max_new_tokens
        self.seed = seed
        self.model_calls = self.generate_calls = self.env_steps = 0

    def describe(self) -> dict[str, Any]:
        return {
            "model": getattr(self.backend, "model", type(self.backend).__name__),
            "temperature": self.temperature,
            "max_new_tokens": self.max_new_tokens,
        }

    def finish(self, episodes: Sequence[Episode], seed: int | None = None) -> list[Episode]:
        """Play the given (new or partly played) episodes to their end, in lockstep."""
        before = sum(e.steps for e in episodes)
        counts = play(
            self.backend,
            episodes,
            temperature=self.temperature,
            seed=self.seed if seed is None else seed,
            max_new_tokens=self.max_new_tokens,
        )
        self.model_calls += counts["model_calls"]
        self.generate_calls += counts["generate_calls"]
        self.env_steps += sum(e.steps for e in episodes) - before
        return list(episodes)

    def rollout(
        self,
        intents: Sequence[Intent],
        catalog: list[Item],
        *,
        avoid: Sequence[Sequence[str]] | None = None,
        max_steps: int = MAX_STEPS,
        seed: int | None = None,
    ) -> list[Episode]:
        """One fresh episode per intent (repeat an intent for several), played in lockstep."""
        if avoid is not None and len(avoid) != len(intents):
            raise ValueError(f"avoid has {len(avoid)} entries for {len(intents)} intents")
        episodes = [
            Episode.start(catalog, intent, avoid[k] if avoid else (), max_steps)
            for k, intent in enumerate(intents)
        ]
        return self.finish(episodes, seed)

    def sample_actions(self, episodes: Sequence[Episode], k: int, seed: int) -> list[list[str]]:
        """k sampled next actions for each episode, in one batched call (MCTS expansion)."""
        prompts = [e.prompt() for e in episodes for _ in range(k)]
        if not prompts:
            return []
        actions = self.backend.generate(
            prompts,
            max_new_tokens=self.max_new_tokens,
            temperature=self.temperature,
            stop=["\n"],
            seed=seed,
        )
        self.model_calls += len(prompts)
        self.generate_calls += 1
        return [[a.strip() for a in actions[i * k : (i + 1) * k]] for i in range(len(episodes))]


def trajectory_text(episode: Episode, limit: int = TRAJECTORY_LIMIT) -> str:
    """What the agent did, for the reward model: actions, items seen (title, price), outcome.

    `search[red mug]>small red mug 12>back>small blue mug 9>buy|bought small blue mug 9`.
    Long trajectories keep their end (what was bought) and lose their start.
    """
    parts = []
    before = "shop home"
    for action, observation in episode.env.trajectory:  # the env's own actions (ids)
        if action.startswith("click[") and before.startswith("results"):
            shown = parse_listing(observation) if observation.startswith("item ") else []
            parts.append(f"{shown[0].title} {shown[0].price}" if shown else "noop")
        elif re.fullmatch(r"search\[.+\]", action):
            parts.append(clean_text(action))
        elif action in ("back", "buy") and before.startswith("item "):
            parts.append(action)
        else:
            parts.append("noop")  # an action the env ignored on this page
        before = observation
    item = episode.bought
    outcome = f"|bought {item.title} {item.price}" if item else "|bought nothing"
    steps = ">".join(parts)
    while steps and len(steps) + len(outcome) > limit:
        steps = ".." + steps[2:].split(">", 1)[1] if ">" in steps[2:] else ""
    return steps + outcome


def reward_prompt(intent: Intent) -> str:
    """The reward model's prompt: the trajectory text follows it."""
    return f"task: {intent_words(intent)}\n"


# --- 3. refinement and 4. triplets ---


def refine_intent(item: Item, rng: random.Random, price_slack: int = 15) -> Intent:
    """The intent the trajectory that bought `item` fulfils: its attributes, a bound >= price."""
    return Intent(item.category, item.color, item.size, item.price + rng.randint(0, price_slack))


def score_on(intent: Intent, episode: Episode) -> float:
    """How well what the episode bought fits `intent`; 0 when it bought nothing."""
    return intent.score(episode.bought) if episode.bought is not None else 0.0


def make_triplets(
    index: int,
    original: Intent,
    episodes: Sequence[Episode],
    others: Sequence[Episode],
    rng: random.Random,
    negatives_per_positive: int = 2,
    price_slack: int = 15,
) -> list[dict]:
    """Triplets from one intent's episodes: each buyer is a positive for its refined intent.

    `others` are episodes of other intents in the same batch, used for one
    negative when no episode of this intent scores lower on the refined intent.
    """
    texts = [trajectory_text(e) for e in episodes]
    rows: list[dict] = []
    used_positive: set[str] = set()
    for i, episode in enumerate(episodes):
        if episode.bought is None or texts[i] in used_positive:
            continue  # a trajectory that bought nothing fulfils no intent; no duplicates
        used_positive.add(texts[i])
        refined = refine_intent(episode.bought, rng, price_slack)
        seen_negative: set[str] = set()
        negatives = []
        for j, other in enumerate(episodes):
            score = score_on(refined, other)
            if j != i and score < 1.0 and texts[j] not in seen_negative:
                seen_negative.add(texts[j])
                negatives.append((f"{j}", texts[j], score, "same_intent"))
        if not negatives and others:
            other = others[rng.randrange(len(others))]
            score = score_on(refined, other)
            if score < 1.0:
                negatives.append(("x", trajectory_text(other), score, "same_batch"))
        if len(negatives) > negatives_per_positive:
            negatives = rng.sample(negatives, negatives_per_positive)
        for tag, text, score, source in negatives:
            prompt = reward_prompt(refined)
            rows.append(
                {
                    "id": f"{index:06d}-{i}-{tag}",
                    "intent": intent_words(refined),
                    "positive": texts[i],
                    "negative": text,
                    "positive_score": score_on(refined, episode),
                    "negative_score": score,
                    "original_intent": intent_words(original),
                    "negative_source": source,
                    "prompt": prompt,
                    "chosen": texts[i],
                    "rejected": text,
                }
            )
    return rows


def _chunk_seed(seed: int, first_index: int) -> int:
    # from the chunk's own position: a resumed run samples exactly what the killed one did
    return (seed * 1_000_003 + first_index * 7919) % (2**31 - 1)


def _map(
    checkpoint: Checkpoint | None,
    stage: str,
    items: Sequence[Any],
    fn: Callable[[list[Any]], list[dict]],
    chunk_size: int,
) -> list[dict]:
    """Checkpoint.map_chunks, or the same chunks in memory (so rows are the same either way)."""
    if checkpoint is not None:
        return checkpoint.map_chunks(stage, items, fn, chunk_size=chunk_size)
    rows: list[dict] = []
    for start in range(0, len(items), chunk_size):
        rows.extend(fn(list(items[start : start + chunk_size])))
    return rows


def synthesize_triplets(
    config: ArmapConfig,
    proposer: IntentProposer | None,
    agent: ShopAgent,
    checkpoint: Checkpoint | None = None,
) -> tuple[list[dict], list[dict], dict[str, Any]]:
    """Propose intents, sample trajectories, refine intents, build triplets.

    `proposer` None means the world's sampler (only with config.proposer
    "world"). Returns (triplets, failures, figures); failures are intent
    answers that did not parse, with their raw text, error and prompt.
    """
    if proposer is None:
        if config.proposer != "world":
            raise ValueError(
                "config.proposer is 'llm' but no proposer was given: pass an "
                "LLMIntentProposer(backend), or set proposer='world'"
            )
        proposer = WorldIntentProposer()
    if proposer.kind != config.proposer:
        raise ValueError(
            f"config.proposer is {config.proposer!r} but the proposer given is a "
            f"{type(proposer).__name__} (kind {proposer.kind!r}); make them agree"
        )
    started = time.monotonic()
    catalog = make_catalog(config.catalog_size, seed=config.catalog_seed)
    key = Checkpoint.key("armap", config.model_dump(), proposer.describe(), agent.describe())

    def propose(indices: list[int]) -> list[dict]:
        return proposer.propose(catalog, indices, config.seed)

    proposals = _map(
        checkpoint, f"armap-intents-{key}", list(range(config.intents)), propose, config.chunk_size
    )

    def trajectories(chunk: list[dict]) -> list[dict]:
        valid = [p for p in chunk if p["intent"] is not None]
        k = config.trajectories_per_intent
        intents = [intent_from_dict(p["intent"]) for p in valid]
        episodes = agent.rollout(
            [intent for intent in intents for _ in range(k)],
            catalog,
            max_steps=config.max_steps,
            seed=_chunk_seed(config.seed, chunk[0]["index"]),
        )
        groups = {p["index"]: episodes[n * k : (n + 1) * k] for n, p in enumerate(valid)}
        out = []
        for p in chunk:
            group = groups.get(p["index"], [])
            others = [e for index, g in groups.items() if index != p["index"] for e in g]
            rng = random.Random(f"refine-{config.seed}-{p['index']}")
            rows = (
                make_triplets(
                    p["index"],
                    intent_from_dict(p["intent"]),
                    group,
                    others,
                    rng,
                    config.negatives_per_positive,
                    config.price_slack,
                )
                if group
                else []
            )
            out.append(
                {
                    "index": p["index"],
                    "triplets": rows,
                    "episodes": len(group),
                    "bought": sum(e.bought is not None for e in group),
                    "rewards": [e.reward for e in group],
                    "model_calls": sum(len(e.actions) for e in group),
                    "env_steps": sum(e.steps for e in group),
                }
            )
        log.info(
            "armap: intents %d-%d: %d episodes, %d triplets",
            chunk[0]["index"],
            chunk[-1]["index"],
            len(episodes),
            sum(len(r["triplets"]) for r in out),
        )
        return out

    per_intent = _map(
        checkpoint, f"armap-triplets-{key}", proposals, trajectories, config.chunk_size
    )
    triplets = [row for r in per_intent for row in r["triplets"]]
    failures = [
        {
            "index": p["index"],
            "stage": "propose",
            "prompt": p["prompt"],
            "raw": p["raw"],
            "error": p["error"],
        }
        for p in proposals
        if p["intent"] is None
    ]
    rewards = [x for r in per_intent for x in r["rewards"]]
    episodes = max(1, len(rewards))
    figures = {
        "intents": config.intents,
        "intent_failures": len(failures),
        "episodes": len(rewards),
        "agent_success": sum(x == 1.0 for x in rewards) / episodes,
        "agent_mean_reward": sum(rewards) / episodes,
        "bought_rate": sum(r["bought"] for r in per_intent) / episodes,
        "triplets": len(triplets),
        "triplets_same_intent": sum(t["negative_source"] == "same_intent" for t in triplets),
        "model_calls": sum(r["model_calls"] for r in per_intent),
        "env_steps": sum(r["env_steps"] for r in per_intent),
        "seconds": time.monotonic() - started,
    }
    log.info(
        "armap: %d triplets from %d intents (%d failed to parse), agent success %.2f",
        len(triplets),
        config.intents,
        len(failures),
        figures["agent_success"],
    )
    return triplets, failures, figures
