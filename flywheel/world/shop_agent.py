"""The embedded shop agent: a tiny char-level Llama that acts in the shop through a Backend.

Reading top to bottom:

1. prompts: the task and a compressed observation (results numbered, items to
   avoid marked) fit, with the action the model writes after them, into the
   tiny models' 256 positions; the agent clicks by number;
2. episodes: a ShopEnv plus what the agent remembers (items to avoid, items it
   looked at and left), played in lockstep by `play`: one batched
   `generate` call per step for every live episode;
3. a noisy expert policy that makes the training data: imperfect on purpose,
   so that planners have something to gain over the sampled policy;
4. `train_shop_agent`: supervised training on (prompt, action) pairs from
   fresh expert episodes, then plain success on held-out intents.

Any Backend (a real LLM included) can play the same prompts.
"""

from __future__ import annotations

import logging
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from flywheel.synthesis.environment import Replayable, step_seed
from flywheel.world.models import ALPHABET, ModelSize, char_tokenizer, new_tiny_model, save_tiny
from flywheel.world.shop import MAX_STEPS, Intent, Item, ShopEnv, make_catalog, sample_intent

if TYPE_CHECKING:
    from flywheel.llm import Backend

log = logging.getLogger(__name__)

# 256 positions hold the prompt and the action; the longest action,
# "search[medium white shirt]", has 26 characters and a newline.
PROMPT_LIMIT = 220
ACTION_LIMIT = 30
STOP = ("\n",)
CATALOG_SIZE = 120
# held-out intents come from catalogs whose seeds training never draws
HELD_OUT_INTENT_SEED = 1_000_000_007
TRAIN_CATALOG_SEEDS = 1_000_000

_ALLOWED = set(ALPHABET)
_RESULT = re.compile(r"(\w+) (\w+) (\w+) (\w+) \$?(\d+)")
_ITEM_PAGE = re.compile(r"item (\w+):? (\w+) (\w+) (\w+),?(?: price)? \$?(\d+)")


# --- 1. prompts ---


def clean_text(text: str) -> str:
    """Lowercase text over the char alphabet: `$` dropped, `;` as `,`, other characters out."""
    text = text.lower().replace("$", "").replace(";", ",")
    return "".join(c for c in text if c in _ALLOWED)


def intent_words(intent: Intent) -> str:
    """The intent without the env's `buy a` and `$`: `small red mug under 30`."""
    return f"{intent.size} {intent.color} {intent.category} under {intent.max_price}"


def parse_listing(observation: str) -> list[Item]:
    """The items an env observation shows (a results list or an item page), as Items."""
    obs = re.sub(r"\.? actions:.*$", "", observation.strip(), flags=re.S)
    if m := _ITEM_PAGE.fullmatch(obs):
        item_id, size, color, category, price = m.groups()
        return [Item(item_id, category, color, size, int(price))]
    if not obs.startswith("results: "):
        return []
    items = []
    for entry in obs[len("results: ") :].split(";"):
        if m := _RESULT.fullmatch(entry.strip()):
            item_id, size, color, category, price = m.groups()
            items.append(Item(item_id, category, color, size, int(price)))
    return items


def compress_observation(observation: str, avoid: Sequence[str] = ()) -> str:
    """The env's observation as the agent sees it: no action hints, ids, `$` or `;`.

    Results are numbered, and the agent clicks by number (`click[2]`, see
    `env_action`): copying a 4-character id from a listing is beyond a
    0.1M-parameter char model, choosing one of five numbers is not. Items in
    `avoid` are listed as `avoid` only.
    `results: i001 small red mug $12; ...` -> `results 1 small red mug 12,2 avoid,...`
    """
    obs = re.sub(r"\.? actions:.*$", "", observation.strip(), flags=re.S)
    if obs.startswith("shop home"):
        return "home"
    listed = parse_listing(observation)
    if obs.startswith("item ") and listed:
        return f"item {listed[0].title} {listed[0].price}"
    if obs.startswith("results: "):
        if not listed:
            return "results none"
        blocked = set(avoid)
        return "results " + ",".join(
            f"{k} avoid" if item.id in blocked else f"{k} {item.title} {item.price}"
            for k, item in enumerate(listed, start=1)
        )
    return clean_text(obs)


def env_action(action: str, observation: str) -> str:
    """The agent's action as the env takes it: `click[k]` becomes the k-th listed item's id."""
    action = action.strip()
    if (m := re.fullmatch(r"click\[(\d)\]", action)) and observation.startswith("results: "):
        listed = parse_listing(observation)
        k = int(m.group(1))
        if 1 <= k <= len(listed):
            return f"click[{listed[k - 1].id}]"
    return action


def agent_prompt(intent_text: str, observation: str, avoid: Sequence[str] = ()) -> str:
    """`task: ...\\n<observation>\\naction: `; the model writes the action and `\\n`.

    `intent_text` may be the env's own text (`buy a ... under $30`) or
    `intent_words`; `observation` is the env's (see `compress_observation`).
    """
    task = re.sub(r"^buy an? ", "", clean_text(intent_text).strip())
    head = f"task: {task}\n"
    tail = "\naction: "
    obs = compress_observation(observation, avoid)
    # an unusual observation (another env) is cut, never the task
    obs = obs[: max(0, PROMPT_LIMIT - len(head) - len(tail))]
    return head + obs + tail


# --- 2. episodes, played in lockstep ---


@dataclass
class Episode(Replayable):
    """One shop episode and the agent's memory of it.

    `avoid` is feedback from outside (e.g. items that failed attempts bought);
    `left` are items this episode looked at and went back from. The prompt
    marks both `avoid`, so a model without memory does not click them again.
    `actions` are the agent's own (`click[2]`), replayable on a fresh env.
    """

    env: ShopEnv
    avoid: tuple[str, ...] = ()
    max_steps: int = MAX_STEPS
    actions: list[str] = field(default_factory=list)
    left: list[str] = field(default_factory=list)
    viewed: list[Item] = field(default_factory=list)
    bought: Item | None = None

    @classmethod
    def start(
        cls,
        catalog: list[Item],
        intent: Intent,
        avoid: Sequence[str] = (),
        max_steps: int = MAX_STEPS,
    ) -> Episode:
        env = ShopEnv(catalog, intent)
        env.reset()
        return cls(env=env, avoid=tuple(avoid), max_steps=min(max_steps, MAX_STEPS))

    @property
    def intent(self) -> Intent:
        return self.env.intent

    @property
    def done(self) -> bool:
        return self.env.done or len(self.actions) >= self.max_steps

    @property
    def reward(self) -> float:
        """Intent.score of the bought item; 0 when nothing was bought."""
        return self.env.reward

    @property
    def steps(self) -> int:
        return self.env.steps

    @property
    def blocked(self) -> tuple[str, ...]:
        """Ids the prompt marks `avoid`: feedback, then items left in this episode."""
        return (*self.avoid, *self.left)

    def prompt(self) -> str:
        return agent_prompt(intent_words(self.intent), self.env.observation(), self.blocked)

    def apply(self, action: str) -> None:
        """Send one agent action to the env and update the memory."""
        if self.done:
            raise RuntimeError("episode is over")
        action = action.strip()
        observation = self.env.observation()
        before = parse_listing(observation) if observation.startswith("item ") else []
        self.env.step(env_action(action, observation))
        self.actions.append(action)
        if before and action == "back":
            self.left.append(before[0].id)
        elif before and action == "buy" and self.env.done:
            self.bought = before[0]
        elif action.startswith("click[") and self.env.observation().startswith("item "):
            self.viewed.append(parse_listing(self.env.observation())[0])


def play(
    backend: Backend,
    episodes: Sequence[Episode],
    *,
    temperature: float,
    seed: int,
    max_new_tokens: int = ACTION_LIMIT,
) -> dict[str, int]:
    """Play every episode to its end in lockstep: one batched generate call per step.

    Returns {"model_calls": actions generated, "generate_calls": batched calls}.
    """
    model_calls = generate_calls = 0
    step = 0
    while live := [e for e in episodes if not e.done]:
        actions = backend.generate(
            [e.prompt() for e in live],
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            stop=list(STOP),
            seed=step_seed(seed, step),
        )
        for episode, action in zip(live, actions, strict=True):
            episode.apply(action)
        model_calls += len(live)
        generate_calls += 1
        step += 1
    return {"model_calls": model_calls, "generate_calls": generate_calls}


# --- 3. the noisy expert ---


@dataclass(frozen=True)
class ExpertNoise:
    """The expert's habits and slips. Some are systematic (its most likely action is
    wrong), so that even greedy decoding of a model trained on it is imperfect."""

    full_search: float = 0.4  # search all three attribute words
    no_size_search: float = 0.45  # a habit: leave the size out; else one word at random
    click_best: float = 0.4  # the best-matching listed item
    click_first: float = 0.45  # a habit: the first listed item not avoided; else a random one
    buy_match: float = 0.9  # buy a fully matching item (else back)
    buy_near: float = 0.55  # a habit: buy an item that matches 3 of 4 attributes
    buy_miss: float = 0.1  # buy a worse item
    research: float = 0.6  # search again when no listed item matches 3 of 4


def _search_words(intent: Intent, rng: random.Random, noise: ExpertNoise) -> str:
    words = [intent.size, intent.color, intent.category]
    draw = rng.random()
    if draw < noise.full_search:
        return " ".join(words)
    if draw < noise.full_search + noise.no_size_search:
        return f"{intent.color} {intent.category}"
    return rng.choice(words)


def expert_action(episode: Episode, rng: random.Random, noise: ExpertNoise = ExpertNoise()) -> str:
    """The expert's next action, from what the prompt shows (task, avoided items, page)."""
    intent = episode.intent
    observation = episode.env.observation()
    listed = parse_listing(observation)
    if observation.startswith("item ") and listed:
        score = intent.score(listed[0])
        p_buy = (
            noise.buy_match if score == 1.0 else noise.buy_near if score >= 0.75 else noise.buy_miss
        )
        return "buy" if rng.random() < p_buy else "back"
    if observation.startswith("results"):
        blocked = set(episode.blocked)
        options = [(k, i) for k, i in enumerate(listed, start=1) if i.id not in blocked]
        best = max(options, key=lambda o: intent.score(o[1]), default=None)
        if best is None or (intent.score(best[1]) < 0.75 and rng.random() < noise.research):
            return f"search[{_search_words(intent, rng, noise)}]"
        draw = rng.random()
        if draw < noise.click_best:
            chosen = best
        elif draw < noise.click_best + noise.click_first:
            chosen = options[0]
        else:
            chosen = rng.choice(options)
        return f"click[{chosen[0]}]"
    return f"search[{_search_words(intent, rng, noise)}]"


def random_avoid(catalog: list[Item], intent: Intent, rng: random.Random) -> tuple[str, ...]:
    """Ids a failed attempt might have bought: listed for the intent, mostly not matching."""
    probe = ShopEnv(catalog, intent)
    probe.reset()
    probe.step(f"search[{intent.size} {intent.color} {intent.category}]")
    listed = parse_listing(probe.observation())
    pool = [i.id for i in listed if intent.score(i) < 1.0 or rng.random() < 0.1]
    if not pool:
        return ()
    return tuple(rng.sample(pool, min(len(pool), rng.choice([1, 1, 2]))))


def expert_episode(
    catalog: list[Item],
    intent: Intent,
    rng: random.Random,
    avoid: Sequence[str] = (),
    noise: ExpertNoise = ExpertNoise(),
) -> tuple[Episode, list[tuple[str, str]]]:
    """Play one episode with the expert; return it and its (prompt, action) pairs."""
    episode = Episode.start(catalog, intent, avoid)
    pairs = []
    while not episode.done:
        action = expert_action(episode, rng, noise)
        pairs.append((episode.prompt(), action))
        episode.apply(action)
    return episode, pairs


PAGE_WEIGHTS = {"home": 0.3, "results": 0.4, "item": 0.3}


def _page_kind(prompt: str) -> str:
    page = prompt.rsplit("\n", 2)[-2]
    return page.split(" ", 1)[0] if page.startswith(("results", "item")) else "home"


def expert_examples(
    noise: ExpertNoise = ExpertNoise(),
    avoid_rate: float = 0.3,
    batch_size: int = 32,
    page_weights: dict[str, float] | None = None,
) -> Callable[[random.Random], tuple[str, str]]:
    """A sampler of fresh (prompt, action) pairs for `train_causal_lm`.

    Every episode has a new random catalog and intent; `avoid_rate` of them
    carry ids to avoid, as Reflexion's retries do. Runs of `batch_size`
    consecutive pairs come from one kind of page (home, results, item): a batch
    is padded to its longest prompt, and a results page is three times as long
    as the others, so mixed batches would cost the padding. Results pages
    (search or click) are the hard decisions and get half of the batches.
    """
    weights = page_weights or PAGE_WEIGHTS
    buffers: dict[str, list[tuple[str, str]]] = {kind: [] for kind in weights}
    state = {"calls": 0, "kind": "home"}

    def sample(rng: random.Random) -> tuple[str, str]:
        if state["calls"] % batch_size == 0:
            state["kind"] = rng.choices(list(weights), weights=list(weights.values()))[0]
        state["calls"] += 1
        buffer = buffers[state["kind"]]
        while not buffer:
            catalog = make_catalog(CATALOG_SIZE, seed=rng.randrange(TRAIN_CATALOG_SEEDS))
            intent = sample_intent(catalog, rng)
            avoid = random_avoid(catalog, intent, rng) if rng.random() < avoid_rate else ()
            for pair in expert_episode(catalog, intent, rng, avoid, noise)[1]:
                buffers[_page_kind(pair[0])].append(pair)
        return buffer.pop(rng.randrange(len(buffer)))

    return sample


# --- 4. training and evaluation ---


def held_out_intents(n: int, seed: int = HELD_OUT_INTENT_SEED) -> tuple[list[Item], list[Intent]]:
    """A catalog and n intents that training never sees."""
    catalog = make_catalog(CATALOG_SIZE, seed=seed)
    rng = random.Random(seed)
    return catalog, [sample_intent(catalog, rng) for _ in range(n)]


def evaluate_shop_agent(
    model_path: str | Path,
    intents: int = 100,
    seed: int = HELD_OUT_INTENT_SEED,
    temperature: float = 1.0,
) -> dict:
    """Plain success of the agent (sampled and greedy) and of the expert on held-out intents."""
    from flywheel.llm import TransformersBackend

    catalog, chosen = held_out_intents(intents, seed)
    rng = random.Random(seed)
    expert = [expert_episode(catalog, intent, rng)[0] for intent in chosen]
    out: dict = {"intents": intents, "temperature": temperature}
    with TransformersBackend(model_path, batch_size=128) as backend:
        for name, temp in (("sampled", temperature), ("greedy", 0.0)):
            episodes = [Episode.start(catalog, intent) for intent in chosen]
            play(backend, episodes, temperature=temp, seed=seed)
            out[name] = _rates(episodes)
    out["expert"] = _rates(expert)
    return out


def _rates(episodes: Sequence[Episode]) -> dict[str, float]:
    n = max(1, len(episodes))
    return {
        "success": sum(e.reward == 1.0 for e in episodes) / n,
        "reward": sum(e.reward for e in episodes) / n,
        "bought": sum(e.bought is not None for e in episodes) / n,
        "steps": sum(e.steps for e in episodes) / n,
    }


def train_shop_agent(
    out_dir: str | Path,
    seed: int = 0,
    size: ModelSize = "small",
    *,
    steps: int = 2500,
    lr: float = 6e-3,
    batch_size: int = 8,
    eval_intents: int = 100,
) -> dict:
    """Train a tiny Llama on expert (prompt, action) pairs for `steps` steps; save it to out_dir.

    Small batches at a high learning rate: for the same CPU time, more updates
    teach the 0.1M model more than larger batches do.

    Returns {"path", "size", "parameters", "train", "eval"}; "eval" holds plain
    success (sampled at temperature 1 and greedy) and the expert's, on held-out
    intents (skipped when eval_intents is 0).
    """
    from flywheel.world.training import train_causal_lm

    model = new_tiny_model(size, seed=seed)
    stats = train_causal_lm(
        model,
        char_tokenizer(),
        expert_examples(batch_size=batch_size),
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        seed=seed,
        progress=lambda step, loss: log.info("shop-agent step %d loss %.3f", step, loss),
    )
    path = save_tiny(model, out_dir)
    report = {
        "path": str(path),
        "size": size,
        "parameters": sum(p.numel() for p in model.parameters()),
        "train": stats,
    }
    if eval_intents:
        report["eval"] = evaluate_shop_agent(path, eval_intents)
    return report
