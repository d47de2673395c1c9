"""ARMAP triplet synthesis on any `Environment`: intents, trajectories, refined intents, triplets.

After "Scaling Autonomous Agents via Automatic Reward Modeling and Planning"
(ICLR 2025). No human labels: an LLM (or the environment's own sampler)
proposes task intents, the agent acts on them, and each trajectory is made a
correct answer by rewriting its intent to what it actually did. The environment
(see `flywheel.synthesis.environment`; the shop is `flywheel.world.shop_env`)
decides what a task is, what the agent sees and what a trajectory fulfils.
Reading top to bottom:

1. intents: `WorldIntentProposer` samples them with `Environment.sample_task`;
   `LLMIntentProposer` asks any Backend, shown `Environment.task_prompt`. An
   answer that does not parse is kept as a failure with its raw text, the
   error and the prompt;
2. trajectories: the `Agent` samples `trajectories_per_intent` episodes per
   intent through `Backend.generate`, every episode of a chunk in lockstep
   (one batched call per step);
3. refinement: a trajectory that fulfils some task (`Environment.refine`) gets
   its intent rewritten to that task; on it, it scores 1.0, so it is a positive;
4. triplets: negatives are other trajectories of the same intent that score
   lower on the refined intent; when there is none, one from another intent of
   the chunk. Rows carry `prompt`/`chosen`/`rejected`, so `train_reward_model`
   trains on them directly.

`synthesize_triplets` runs chunks of intents through `Checkpoint.map_chunks`:
a killed run, re-run with the same folder, gives the same rows, once each.
"""

from __future__ import annotations

import hashlib
import logging
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import KW_ONLY, dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Literal, Protocol

import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field

from flywheel.llm import Backend
from flywheel.store import Checkpoint
from flywheel.synthesis import environment as environment_module
from flywheel.synthesis.environment import (
    MAX_STEPS,
    Agent,
    Environment,
    Episode,
    TaskParseError,
    reward_prompt,
    step_seed,
)

log = logging.getLogger(__name__)


class ArmapConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    intents: int = Field(200, ge=1, description="task intents to propose")
    trajectories_per_intent: int = Field(6, ge=2, description="sampled episodes per intent")
    temperature: float = Field(1.0, ge=0, description="the agent's sampling temperature")
    max_steps: int = Field(MAX_STEPS, ge=1, le=MAX_STEPS, description="steps per episode")
    seed: int = 0
    proposer: Literal["world", "llm"] = "world"
    negatives_per_positive: int = Field(2, ge=1)
    chunk_size: int = Field(16, ge=1, description="intents per checkpointed chunk")


# --- 1. intents ---


class IntentProposer(Protocol):
    """Proposes one intent per index; the same (index, seed) gives the same answer.

    A proposal is {"index", "intent" (the task's text, None when it did not
    parse), "raw", "prompt", "error"}.
    """

    kind: str

    def describe(self) -> dict[str, Any]: ...

    def propose(
        self, environment: Environment, indices: Sequence[int], seed: int
    ) -> list[dict]: ...


def _proposal(index: int, text: str | None, **extra: Any) -> dict[str, Any]:
    return {"index": index, "intent": text, **extra}


class WorldIntentProposer:
    """The environment's own sampler: an intent the world can fulfil."""

    kind = "world"

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind}

    def propose(self, environment: Environment, indices: Sequence[int], seed: int) -> list[dict]:
        out = []
        for index in indices:
            task = environment.sample_task(random.Random(f"{seed}-{index}"))
            text = environment.task_text(task)
            out.append(_proposal(index, text, raw=text, prompt=None, error=None))
        return out


@dataclass(eq=False)
class LLMIntentProposer:
    """Any Backend writes the intents, shown the environment's `task_prompt` per intent
    (`items_shown` examples of its world).

    Answers that do not parse become failure rows (raw text, error, prompt).
    """

    kind = "llm"

    backend: Backend
    _: KW_ONLY
    temperature: float = 0.7
    items_shown: int = 3
    max_new_tokens: int = 40

    def __post_init__(self) -> None:
        if self.items_shown < 1:
            raise ValueError(f"items_shown must be at least 1, got {self.items_shown}")

    def describe(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "model": getattr(self.backend, "model", type(self.backend).__name__),
            "temperature": self.temperature,
            "items_shown": self.items_shown,
        }

    def prompt(self, environment: Environment, index: int, seed: int) -> str:
        return environment.task_prompt(random.Random(f"{seed}-{index}"), self.items_shown)

    def propose(self, environment: Environment, indices: Sequence[int], seed: int) -> list[dict]:
        if not indices:
            return []
        prompts = [self.prompt(environment, index, seed) for index in indices]
        answers = self.backend.generate(
            prompts,
            max_new_tokens=self.max_new_tokens,
            temperature=self.temperature,
            stop=["\n"],
            seed=seed * 1_000_003 + indices[0],  # per chunk: a resumed chunk samples the same
        )
        out = []
        for index, prompt, answer in zip(indices, prompts, answers, strict=True):
            try:
                text, error = environment.task_text(environment.parse_task(answer)), None
            except TaskParseError as e:
                text, error = None, str(e)
            out.append(_proposal(index, text, raw=answer, prompt=prompt, error=error))
        return out


# --- 3. refinement and 4. triplets ---


def make_triplets(
    index: int,
    original: Any,
    episodes: Sequence[Episode],
    others: Sequence[Episode],
    rng: random.Random,
    negatives_per_positive: int = 2,
) -> list[dict]:
    """Triplets from one intent's episodes: each one that fulfils a task is a positive
    for that (refined) task.

    `others` are episodes of other intents in the same batch, used for one
    negative when no episode of this intent scores lower on the refined intent.
    """
    texts = [e.trajectory_text() for e in episodes]
    rows: list[dict] = []
    used_positive: set[str] = set()
    for i, episode in enumerate(episodes):
        if texts[i] in used_positive:
            continue  # no duplicate positives
        refined = episode.env.refine(rng)
        if refined is None:
            continue  # a trajectory that fulfils no task is no positive
        used_positive.add(texts[i])
        seen_negative: set[str] = set()
        negatives = []
        for j, other in enumerate(episodes):
            score = other.env.score(refined)
            if j != i and score < 1.0 and texts[j] not in seen_negative:
                seen_negative.add(texts[j])
                negatives.append((f"{j}", texts[j], score, "same_intent"))
        if not negatives and others:
            other = others[rng.randrange(len(others))]
            score = other.env.score(refined)
            if score < 1.0:
                negatives.append(("x", other.trajectory_text(), score, "same_batch"))
        if len(negatives) > negatives_per_positive:
            negatives = rng.sample(negatives, negatives_per_positive)
        refined_text = episode.env.task_text(refined)
        for tag, text, score, source in negatives:
            rows.append(
                {
                    "id": f"{index:06d}-{i}-{tag}",
                    "intent": refined_text,
                    "positive": texts[i],
                    "negative": text,
                    "positive_score": episode.env.score(refined),
                    "negative_score": score,
                    "original_intent": episode.env.task_text(original),
                    "negative_source": source,
                    "prompt": reward_prompt(refined_text),
                    "chosen": texts[i],
                    "rejected": text,
                }
            )
    return rows


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
    agent: Agent,
    checkpoint: Checkpoint | None = None,
    *,
    environment: Environment,
) -> tuple[list[dict], list[dict], dict[str, Any]]:
    """Propose intents, sample trajectories in `environment`, refine intents, build triplets.

    `proposer` None means the environment's sampler (only with config.proposer
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
    key = Checkpoint.key(
        "armap",
        config.model_dump(),
        environment.describe(),
        proposer.describe(),
        agent.describe(),
    )

    def propose(indices: list[int]) -> list[dict]:
        return proposer.propose(environment, indices, config.seed)

    proposals = _map(
        checkpoint, f"armap-intents-{key}", list(range(config.intents)), propose, config.chunk_size
    )

    def trajectories(chunk: list[dict]) -> list[dict]:
        valid = [p for p in chunk if p["intent"] is not None]
        k = config.trajectories_per_intent
        intents = [environment.parse_task(p["intent"]) for p in valid]
        episodes = agent.rollout(
            [intent for intent in intents for _ in range(k)],
            environment,
            max_steps=config.max_steps,
            # from the chunk's own position: a resumed run samples exactly what the killed one did
            seed=step_seed(config.seed, chunk[0]["index"]),
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
                    environment.parse_task(p["intent"]),
                    group,
                    others,
                    rng,
                    config.negatives_per_positive,
                )
                if group
                else []
            )
            out.append(
                {
                    "index": p["index"],
                    "triplets": rows,
                    "episodes": len(group),
                    # fulfilled some task (the shop: bought an item); a throwaway rng
                    "bought": sum(e.env.refine(random.Random(0)) is not None for e in group),
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


# --- for the flows: environments by name, the datasets a run writes ---


@dataclass(frozen=True)
class EnvironmentEntry:
    """How a flow builds one environment: for synthesis from the run's parameters (where
    an environment's own settings live, e.g. the shop's catalog), and with its held-out
    tasks for the planners."""

    build: Callable[[Any], Environment]
    held_out: Callable[[int], tuple[Environment, list[Any]]]
    modules: tuple[ModuleType, ...]  # their source is part of the checkpoint key

    def source_digest(self) -> str:
        """A digest of ARMAP's, the environment protocol's and this environment's source:
        a checkpoint made by other code is not reused."""
        files = (__file__, environment_module.__file__, *(m.__file__ for m in self.modules))
        return hashlib.sha256(b"".join(Path(f).read_bytes() for f in files)).hexdigest()


# text columns, but for the environment's two scores
TRIPLET_SCHEMA = pa.schema(
    [
        *((c, pa.string()) for c in ("id", "intent", "original_intent", "positive", "negative")),
        ("positive_score", pa.float64()),
        ("negative_score", pa.float64()),
        *((c, pa.string()) for c in ("negative_source", "prompt", "chosen", "rejected")),
    ]
)
FAILED_SCHEMA = pa.schema(
    [("index", pa.int64()), *((c, pa.string()) for c in ("stage", "prompt", "raw", "error"))]
)


def triplet_rows(triplets: Sequence[dict]) -> list[dict]:
    return [{k: t[k] for k in TRIPLET_SCHEMA.names} for t in triplets]


def failure_rows(failures: Sequence[dict]) -> list[dict]:
    return [{k: f[k] for k in FAILED_SCHEMA.names} for f in failures]


def summary_figures(figures: dict[str, Any]) -> dict[str, Any]:
    """`synthesize_triplets`' figures as a run summary shows them."""
    return {
        "triplets": figures["triplets"],
        "intents": figures["intents"],
        "intent proposals that did not parse": figures["intent_failures"],
        "episodes": figures["episodes"],
        "agent success rate (plain sampling)": figures["agent_success"],
        "agent mean reward": figures["agent_mean_reward"],
    }
