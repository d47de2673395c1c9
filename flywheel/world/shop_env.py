"""The shop as an ARMAP `Environment` (see `flywheel.synthesis.environment`).

The episode is the shop agent's own `Episode` (flywheel.world.shop_agent): the
observation is its compressed prompt (results numbered, avoided items marked),
the agent clicks by number, a task is an `Intent`, and a trajectory that bought
an item is refined to that item's attributes and a price bound at or above its
price. Feedback for a retry is the id of the item a failed attempt bought.
"""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Sequence
from typing import Any

from flywheel.synthesis.environment import Agent, TaskParseError
from flywheel.synthesis.environment import reward_prompt as _reward_prompt
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
    Episode,
    clean_text,
    held_out_intents,
    intent_words,
    parse_listing,
)

TRAJECTORY_LIMIT = 170  # with the reward prompt (<= 36) well inside 256 positions

# The acting policy is the generic one; the name stays for the shop's callers.
ShopAgent = Agent

INTENT_PROMPT = (
    "shop items: {items}\n"
    "write a task to buy one of them, as: buy a (size) (color) (category) under (price)\n"
    "task: "
)

_INTENT = re.compile(r"buy an? (\w+) (\w+) (\w+) under \$?(\d+)")


class IntentParseError(TaskParseError):
    """An answer that is not `buy a <size> <color> <category> under <n>` over the shop."""


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
    """The reward model's prompt for a shop intent: the trajectory text follows it."""
    return _reward_prompt(intent_words(intent))


def refine_intent(item: Item, rng: random.Random, price_slack: int = 15) -> Intent:
    """The intent the trajectory that bought `item` fulfils: its attributes, a bound >= price."""
    return Intent(item.category, item.color, item.size, item.price + rng.randint(0, price_slack))


class ShopEnvironment:
    """The shop over one catalog; an instance also holds one episode once `reset`."""

    name = "shop"
    max_steps = MAX_STEPS

    def __init__(self, catalog: list[Item], price_slack: int = 15) -> None:
        if not catalog:
            raise ValueError("catalog is empty: the shop needs items")
        self.catalog = catalog
        self.price_slack = price_slack
        self.episode: Episode | None = None

    @classmethod
    def from_settings(
        cls, catalog_size: int = 120, catalog_seed: int = 0, price_slack: int = 15
    ) -> ShopEnvironment:
        return cls(make_catalog(catalog_size, seed=catalog_seed), price_slack)

    def describe(self) -> dict[str, Any]:
        catalog = hashlib.sha256(repr(self.catalog).encode()).hexdigest()[:16]
        return {"name": self.name, "catalog": catalog, "price_slack": self.price_slack}

    def fresh(self) -> ShopEnvironment:
        return ShopEnvironment(self.catalog, self.price_slack)

    # --- the task source ---

    def sample_task(self, rng: random.Random) -> Intent:
        return sample_intent(self.catalog, rng)

    def task_prompt(self, rng: random.Random, shown: int) -> str:
        items = rng.sample(self.catalog, min(shown, len(self.catalog)))
        return INTENT_PROMPT.format(items=", ".join(f"{i.id} {i.title} {i.price}" for i in items))

    def parse_task(self, text: str) -> Intent:
        # the proposer's prompt ends in "task: ", so a bare "small red mug under 9" is accepted
        text = text if text.lstrip().lower().startswith("buy") else "buy a " + text.strip()
        return parse_intent(text)

    def task_text(self, task: Intent) -> str:
        return intent_words(task)

    # --- one episode ---

    def _current(self) -> Episode:
        if self.episode is None:
            raise RuntimeError("no episode: call reset(task) first")
        return self.episode

    def reset(self, task: Intent, feedback: Sequence[str] = ()) -> str:
        self.episode = Episode.start(self.catalog, task, feedback)
        return self.episode.prompt()

    def step(self, action: str) -> tuple[str, bool]:
        episode = self._current()
        episode.apply(action)
        return episode.prompt(), episode.done

    def score(self, task: Intent | None = None) -> float:
        episode = self._current()
        if episode.bought is None:
            return 0.0
        return (task or episode.intent).score(episode.bought)

    def refine(self, rng: random.Random) -> Intent | None:
        bought = self._current().bought
        return None if bought is None else refine_intent(bought, rng, self.price_slack)

    def feedback(self) -> str | None:
        bought = self._current().bought
        return None if bought is None else bought.id

    def trajectory_text(self) -> str:
        return trajectory_text(self._current())


def held_out_tasks(n: int) -> tuple[ShopEnvironment, list[Intent]]:
    """The shop over the held-out catalog and n held-out intents (the planners' tasks)."""
    catalog, intents = held_out_intents(n)
    return ShopEnvironment(catalog), list(intents)


_TASK = re.compile(r"task: (\w+) (\w+) (\w+) under (\d+)")
_BOUGHT = re.compile(r"\|bought (\w+) (\w+) (\w+) (\d+)$")


class EnvScoreOracle:
    """The shop's true reward behind the reward-model interface (an upper bound to planning).

    Reads the intent from the prompt and the bought item from the trajectory
    text, and returns `Intent.score` of that item (0 when nothing was bought).
    """

    def score(self, prompts: Sequence[str], completions: Sequence[str]) -> list[float]:
        if len(prompts) != len(completions):
            raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
        out = []
        for prompt, completion in zip(prompts, completions, strict=True):
            task = _TASK.match(prompt)
            if task is None:
                raise ValueError(f"not a shop reward prompt: {prompt!r}")
            size, color, category, price = task.groups()
            intent = Intent(category, color, size, int(price))
            bought = _BOUGHT.search(completion)
            if bought is None:
                out.append(0.0)
                continue
            b_size, b_color, b_category, b_price = bought.groups()
            out.append(intent.score(Item("", b_category, b_color, b_size, int(b_price))))
        return out
