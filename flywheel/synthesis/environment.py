"""What ARMAP and its planners need from an environment, and the agent that acts in one.

An `Environment` is a text task family with one episode's state: `reset(task)`
starts an episode and returns the first observation, `step(action)` returns the
next observation and whether the episode ended. The observation is the agent's
whole prompt (task, state, feedback): the agent sends it to its Backend as is
and the answer, up to its first newline, is the action. Everything else ARMAP
needs is in terms of the environment's own task objects:

- the task source: `sample_task` (tasks the world can fulfil), `task_prompt`
  (what an LLM proposer is shown and the format it should answer in),
  `parse_task` (an answer to a task, or `TaskParseError` saying what is wrong),
  `task_text` (the task as the reward model reads it; `parse_task` reads it back);
- outcomes: `score(task)` (how well the episode so far fulfils `task`, in
  [0, 1]; 1 is success; its own task by default), `refine(rng)` (the task the
  trajectory fulfils, None when it fulfils none: ARMAP's refined intent),
  `feedback()` (what a retry should avoid, for Reflexion; None for nothing)
  and `trajectory_text()` (what the reward model reads);
- `fresh()`: a new environment over the same world, not started (episodes run
  in lockstep, and planners rebuild states by replaying actions on one, so an
  environment must be deterministic given its task, feedback and actions).

`RewardScorer` is what planners call: anything with `score(prompts,
completions)` returning one float per pair (a `RewardModel`; an ensemble's dict
is read by its "mean").
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, Self

from flywheel.llm import Backend

# The most steps an ARMAP episode takes: the tiny agents' prompts and the reward
# model's 256 positions hold trajectories of about this many steps.
MAX_STEPS = 10
ACTION_LIMIT = 30  # tokens the agent may write for one action
STOP = ("\n",)


class TaskParseError(ValueError):
    """A proposed task the environment cannot read; the message says what is wrong."""


class Environment(Protocol):
    """A deterministic text environment: its tasks, and one episode's state."""

    name: str
    max_steps: int  # the environment ends every episode by this many steps

    def describe(self) -> dict[str, Any]:
        """The settings that decide its episodes (for checkpoint keys and reports)."""
        ...

    def fresh(self) -> Environment:
        """A new environment over the same world, not started."""
        ...

    # --- the task source ---

    def sample_task(self, rng: Any) -> Any:
        """A task that the world can fulfil (the world's own intent proposer)."""
        ...

    def task_prompt(self, rng: Any, shown: int) -> str:
        """An LLM proposer's prompt: `shown` examples of the world and the task format."""
        ...

    def parse_task(self, text: str) -> Any:
        """The task an answer states; `TaskParseError` naming what is wrong otherwise."""
        ...

    def task_text(self, task: Any) -> str:
        """The task in words, as the reward model reads it; `parse_task` reads it back."""
        ...

    # --- one episode ---

    def reset(self, task: Any, feedback: Sequence[str] = ()) -> str:
        """Start an episode on `task`; the first observation (the agent's prompt)."""
        ...

    def step(self, action: str) -> tuple[str, bool]:
        """Apply one action (text the environment cannot read costs a step, changes
        nothing); the next observation and whether the episode is over."""
        ...

    def score(self, task: Any = None) -> float:
        """How well the episode so far fulfils `task` (default: its own), in [0, 1]."""
        ...

    def refine(self, rng: Any) -> Any | None:
        """The task this trajectory fulfils (scores 1 on), or None when it fulfils none."""
        ...

    def feedback(self) -> str | None:
        """What a retry of this task should avoid (given to `reset`), or None."""
        ...

    def trajectory_text(self) -> str:
        """What the episode did, for the reward model (short: it follows the task)."""
        ...


class RewardScorer(Protocol):
    """One score per (prompt, trajectory text) pair; an ensemble may return a dict."""

    def score(self, prompts: Sequence[str], completions: Sequence[str]) -> Any: ...


def reward_prompt(task_text: str) -> str:
    """The reward model's prompt: the trajectory text follows it."""
    return f"task: {task_text}\n"


class Replayable:
    """`replay` for an episode class whose `start(world, task, ...)` begins an episode
    and whose `apply(action)` takes one step."""

    @classmethod
    def replay(
        cls, world: Any, task: Any, actions: Sequence[str], *args: Any, **kwargs: Any
    ) -> Self:
        """The same state again: the environment is deterministic, so replaying the actions
        recreates it. The arguments after `actions` are `start`'s (feedback, max_steps)."""
        episode = cls.start(world, task, *args, **kwargs)  # type: ignore[attr-defined]
        for action in actions:
            episode.apply(action)
        return episode


@dataclass
class Episode(Replayable):
    """One episode of an environment: the agent's actions and where they led."""

    env: Environment
    task: Any
    feedback: tuple[str, ...] = ()
    max_steps: int = MAX_STEPS
    actions: list[str] = field(default_factory=list)
    observation: str = ""
    ended: bool = False

    @classmethod
    def start(
        cls,
        environment: Environment,
        task: Any,
        feedback: Sequence[str] = (),
        max_steps: int = MAX_STEPS,
    ) -> Episode:
        env = environment.fresh()
        observation = env.reset(task, tuple(feedback))
        return cls(
            env=env,
            task=task,
            feedback=tuple(feedback),
            max_steps=min(max_steps, env.max_steps),
            observation=observation,
        )

    @property
    def done(self) -> bool:
        return self.ended or len(self.actions) >= self.max_steps

    @property
    def steps(self) -> int:
        return len(self.actions)

    @property
    def reward(self) -> float:
        """The environment's score of the episode on its own task."""
        return self.env.score()

    @property
    def task_text(self) -> str:
        return self.env.task_text(self.task)

    def prompt(self) -> str:
        return self.observation

    def apply(self, action: str) -> None:
        if self.done:
            raise RuntimeError("episode is over")
        action = action.strip()
        self.observation, self.ended = self.env.step(action)
        self.actions.append(action)

    def trajectory_text(self) -> str:
        return self.env.trajectory_text()


def step_seed(seed: int, step: int) -> int:
    """A distinct generate seed per (seed, step), stable across runs."""
    return (seed * 1_000_003 + step * 7919) % (2**31 - 1)


@dataclass(eq=False)
class Agent:
    """The acting policy: any Backend writes one action per step, episodes in lockstep.

    Counts what it costs: `model_calls` (actions generated), `generate_calls`
    (batched calls) and `env_steps`.
    """

    backend: Backend
    temperature: float = 1.0
    max_new_tokens: int = ACTION_LIMIT
    seed: int = 0
    model_calls: int = field(default=0, init=False)
    generate_calls: int = field(default=0, init=False)
    env_steps: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")

    def describe(self) -> dict[str, Any]:
        return {
            "model": getattr(self.backend, "model", type(self.backend).__name__),
            "temperature": self.temperature,
            "max_new_tokens": self.max_new_tokens,
        }

    def _generate(self, prompts: list[str], seed: int) -> list[str]:
        out = self.backend.generate(
            prompts,
            max_new_tokens=self.max_new_tokens,
            temperature=self.temperature,
            stop=list(STOP),
            seed=seed,
        )
        self.model_calls += len(prompts)
        self.generate_calls += 1
        return out

    def finish(self, episodes: Sequence[Episode], seed: int | None = None) -> list[Episode]:
        """Play the given (new or partly played) episodes to their end, in lockstep:
        one batched generate call per step for every live episode."""
        seed = self.seed if seed is None else seed
        step = 0
        while live := [e for e in episodes if not e.done]:
            actions = self._generate([e.prompt() for e in live], step_seed(seed, step))
            for episode, action in zip(live, actions, strict=True):
                episode.apply(action)
            self.env_steps += len(live)
            step += 1
        return list(episodes)

    def rollout(
        self,
        tasks: Sequence[Any],
        environment: Environment,
        *,
        feedback: Sequence[Sequence[str]] | None = None,
        max_steps: int = MAX_STEPS,
        seed: int | None = None,
    ) -> list[Episode]:
        """One fresh episode per task (repeat a task for several), played in lockstep."""
        if feedback is not None and len(feedback) != len(tasks):
            raise ValueError(f"feedback has {len(feedback)} entries for {len(tasks)} tasks")
        episodes = [
            Episode.start(environment, task, feedback[k] if feedback else (), max_steps)
            for k, task in enumerate(tasks)
        ]
        return self.finish(episodes, seed)

    def sample_actions(self, episodes: Sequence[Episode], k: int, seed: int) -> list[list[str]]:
        """k sampled next actions for each episode, in one batched call (MCTS expansion)."""
        prompts = [e.prompt() for e in episodes for _ in range(k)]
        if not prompts:
            return []
        actions = self._generate(prompts, seed)
        return [[a.strip() for a in actions[i * k : (i + 1) * k]] for i in range(len(episodes))]
