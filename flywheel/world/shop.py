"""A small multi-step text shop (search, click, buy) for agent methods such as ARMAP.

The agent sees text observations and sends text actions: `search[words]`,
`click[item id]`, `back`, `buy`. Buying ends the episode with a reward in
[0, 1]: the share of the intent's attributes that the bought item has.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field

CATEGORIES = ["mug", "shirt", "lamp", "shoe", "bag", "hat"]
COLORS = ["red", "blue", "green", "black", "white"]
SIZES = ["small", "medium", "large"]
MAX_STEPS = 10


@dataclass(frozen=True)
class Item:
    id: str
    category: str
    color: str
    size: str
    price: int

    @property
    def title(self) -> str:
        return f"{self.size} {self.color} {self.category}"

    def page(self) -> str:
        return f"item {self.id}: {self.title}, price ${self.price}. actions: buy, back"


@dataclass(frozen=True)
class Intent:
    category: str
    color: str
    size: str
    max_price: int

    @property
    def text(self) -> str:
        return f"buy a {self.size} {self.color} {self.category} under ${self.max_price}"

    def score(self, item: Item) -> float:
        checks = [
            item.category == self.category,
            item.color == self.color,
            item.size == self.size,
            item.price <= self.max_price,
        ]
        return sum(checks) / len(checks)


def make_catalog(n: int = 120, seed: int = 0) -> list[Item]:
    rng = random.Random(seed)
    return [
        Item(
            id=f"i{k:03d}",
            category=rng.choice(CATEGORIES),
            color=rng.choice(COLORS),
            size=rng.choice(SIZES),
            price=rng.randint(5, 60),
        )
        for k in range(n)
    ]


def sample_intent(catalog: list[Item], rng: random.Random) -> Intent:
    """An intent that some item in the catalog satisfies fully."""
    target = rng.choice(catalog)
    return Intent(target.category, target.color, target.size, target.price + rng.randint(0, 15))


@dataclass
class ShopEnv:
    catalog: list[Item]
    intent: Intent
    results_per_page: int = 5
    steps: int = 0
    done: bool = False
    reward: float = 0.0
    trajectory: list[tuple[str, str]] = field(default_factory=list)
    _page: str = "home"
    _item: Item | None = None
    _results: list[Item] = field(default_factory=list)

    def reset(self) -> str:
        self.steps, self.done, self.reward, self.trajectory = 0, False, 0.0, []
        self._page, self._item, self._results = "home", None, []
        return self.observation()

    def observation(self) -> str:
        if self._page == "home":
            return f"shop home. task: {self.intent.text}. actions: search[words]"
        if self._page == "results":
            listed = "; ".join(f"{i.id} {i.title} ${i.price}" for i in self._results) or "none"
            return f"results: {listed}. actions: click[id], search[words]"
        assert self._item is not None
        return self._item.page()

    def _search(self, words: str) -> list[Item]:
        terms = set(words.lower().split())

        def overlap(item: Item) -> int:
            return len(terms & {item.category, item.color, item.size})

        ranked = sorted(self.catalog, key=lambda i: (-overlap(i), i.price, i.id))
        return [i for i in ranked if overlap(i) > 0][: self.results_per_page]

    def step(self, action: str) -> tuple[str, float, bool]:
        """Apply an action; invalid actions cost a step and change nothing."""
        if self.done:
            raise RuntimeError("episode is over: call reset()")
        self.steps += 1
        action = action.strip()
        if m := re.fullmatch(r"search\[(.+)\]", action):
            self._results, self._page = self._search(m.group(1)), "results"
        elif (m := re.fullmatch(r"click\[(\w+)\]", action)) and self._page == "results":
            chosen = next((i for i in self._results if i.id == m.group(1)), None)
            if chosen is not None:
                self._item, self._page = chosen, "item"
        elif action == "back" and self._page == "item":
            self._page = "results"
        elif action == "buy" and self._page == "item" and self._item is not None:
            self.done, self.reward = True, self.intent.score(self._item)
        if self.steps >= MAX_STEPS and not self.done:
            self.done = True
        observation = self.observation()
        self.trajectory.append((action, observation))
        return observation, self.reward, self.done
