"""Planning with a reward model in any `Environment` (ARMAP): best-of-N, Reflexion and MCTS.

After "Scaling Autonomous Agents via Automatic Reward Modeling and Planning"
(ICLR 2025): the agent proposes, a reward model trained on synthesized
triplets judges whole trajectories, and a planner spends more episodes to
execute a better one. Every planner here runs many intents at once, in
lockstep, so that the agent's calls are batched:

- `plain()`: one sampled episode per intent (the policy itself, the baseline);
- `best_of_n(n)`: n sampled episodes, the reward model's favourite is executed;
- `reflexion(trials, threshold)`: try; while the reward model scores the
  attempt below `threshold`, retry with feedback in the prompt
  (`Environment.feedback` of the failed attempts; the shop: the items they
  bought, marked `avoid`);
- `mcts(simulations, c_uct, horizon, expand_k)`: UCT over action sequences;
  a node is expanded with k actions sampled from the agent, a simulation is
  finished by the agent, and its value is the reward model's score.

The reward model is anything with `score(prompts, completions)` returning one
float per pair (a `RewardModel`; an `EnsembleRewardModel`'s dict is read by its
"mean"). The shop's true score behind the same interface is
`flywheel.world.shop_env.EnvScoreOracle`. `evaluate` reports mean env reward,
success rate, and env steps, agent calls and reward-model calls per intent.
"""

from __future__ import annotations

import math
import time
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import pyarrow as pa

from flywheel.synthesis.environment import (
    MAX_STEPS,
    Agent,
    Environment,
    Episode,
    RewardScorer,
    reward_prompt,
    step_seed,
)

Scorer = RewardScorer  # the name planners used before


def reward_scores(scorer: RewardScorer, episodes: Sequence[Episode]) -> list[float]:
    """The scorer's reward for each episode's trajectory text given its intent."""
    if not episodes:
        return []
    out = scorer.score(
        [reward_prompt(e.task_text) for e in episodes], [e.trajectory_text() for e in episodes]
    )
    if isinstance(out, dict):  # an ensemble: plan with the members' mean
        out = out["mean"]
    return [float(x) for x in out]


@dataclass
class PlanResult:
    """What a planner executed for one intent, and what it spent to choose it."""

    intent: Any  # the environment's task, as given
    intent_text: str  # the task in words
    reward: float  # the environment's score of the executed episode
    success: bool  # reward == 1.0
    env_steps: int  # every env step taken, simulations and replays included
    model_calls: int  # actions the agent generated
    rm_calls: int  # trajectories the reward model scored
    episodes: int  # full episodes or simulations run
    actions: list[str]
    trajectory: str
    score: float | None  # the reward model's score of the executed trajectory

    def as_dict(self) -> dict[str, Any]:
        row = asdict(self)
        row["intent"] = row.pop("intent_text")
        return row


def _result(
    episode: Episode,
    *,
    env_steps: int,
    model_calls: int,
    rm_calls: int,
    episodes: int,
    score: float | None,
) -> PlanResult:
    return PlanResult(
        intent=episode.task,
        intent_text=episode.task_text,
        reward=episode.reward,
        success=episode.reward == 1.0,
        env_steps=env_steps,
        model_calls=model_calls,
        rm_calls=rm_calls,
        episodes=episodes,
        actions=list(episode.actions),
        trajectory=episode.trajectory_text(),
        score=score,
    )


def _executed(episode: Episode, played: Sequence[Episode], score: float | None) -> PlanResult:
    """`episode` executed after playing all of `played` (itself among them), each
    scored once by the reward model; `score` None: no reward model was asked."""
    return _result(
        episode,
        env_steps=sum(e.steps for e in played),
        model_calls=sum(len(e.actions) for e in played),
        rm_calls=0 if score is None else len(played),
        episodes=len(played),
        score=score,
    )


def _positive(name: str, value: float) -> None:
    if value < 1:
        raise ValueError(f"{name} must be at least 1, got {value}")


@dataclass
class _Job:
    """One `Planner.run` call: what to plan for, and with what."""

    agent: Agent
    reward_model: RewardScorer | None
    intents: Sequence[Any]
    environment: Environment
    seed: int

    def scores(self, episodes: Sequence[Episode]) -> list[float]:
        assert self.reward_model is not None, "run() checks that planners that score have one"
        return reward_scores(self.reward_model, episodes)


class Planner(ABC):
    name: str
    needs_reward_model = True

    @abstractmethod
    def budget(self) -> dict[str, Any]:
        """The planner's settings, for reports."""

    def run(
        self,
        agent: Agent,
        reward_model: RewardScorer | None,
        intents: Sequence[Any],
        environment: Environment,
        seed: int = 0,
    ) -> list[PlanResult]:
        """Plan and execute one fresh episode per intent; results in intent order."""
        if reward_model is None and self.needs_reward_model:
            raise ValueError(f"{self.name} needs a reward model")
        return self._plan(_Job(agent, reward_model, intents, environment, seed))

    @abstractmethod
    def _plan(self, job: _Job) -> list[PlanResult]:
        """`run`'s work, its arguments checked."""


class Plain(Planner):
    """The sampled policy: one episode per intent, no reward model."""

    name = "plain"
    needs_reward_model = False

    def budget(self) -> dict[str, Any]:
        return {"episodes": 1}

    def _plan(self, job: _Job) -> list[PlanResult]:
        episodes = job.agent.rollout(job.intents, job.environment, seed=job.seed)
        return [_executed(e, [e], score=None) for e in episodes]


class BestOfN(Planner):
    """n sampled episodes per intent; the one the reward model scores highest is executed."""

    name = "best_of_n"

    def __init__(self, n: int = 8) -> None:
        _positive("n", n)
        self.n = n

    def budget(self) -> dict[str, Any]:
        return {"n": self.n}

    def _plan(self, job: _Job) -> list[PlanResult]:
        n = self.n
        episodes = job.agent.rollout(
            [i for i in job.intents for _ in range(n)], job.environment, seed=job.seed
        )
        scores = job.scores(episodes)
        out = []
        for k in range(len(job.intents)):
            group, group_scores = episodes[k * n : (k + 1) * n], scores[k * n : (k + 1) * n]
            best = max(range(n), key=lambda j: group_scores[j])
            out.append(_executed(group[best], group, score=group_scores[best]))
        return out


class Reflexion(Planner):
    """Attempt, judge with the reward model, retry with feedback while below threshold.

    The feedback is what failed attempts' `Environment.feedback` named (the
    shop: the items they bought, which the retry's prompt marks `avoid`; the
    shop agent was trained on such prompts). When
    every trial stays below the threshold, `final="best"` executes the attempt
    the reward model scored highest (it has scored them all already, and the
    last attempt is not better by construction); `final="last"` the last one.
    """

    name = "reflexion"

    def __init__(
        self, trials: int = 3, threshold: float = 0.0, final: Literal["best", "last"] = "best"
    ) -> None:
        _positive("trials", trials)
        if final not in ("best", "last"):
            raise ValueError(f"final must be 'best' or 'last', got {final!r}")
        self.trials, self.threshold, self.final = trials, threshold, final

    def budget(self) -> dict[str, Any]:
        return {"trials": self.trials, "threshold": self.threshold, "final": self.final}

    def _plan(self, job: _Job) -> list[PlanResult]:
        attempts: list[list[tuple[Episode, float]]] = [[] for _ in job.intents]
        avoid: list[list[str]] = [[] for _ in job.intents]
        pending = list(range(len(job.intents)))
        for trial in range(self.trials):
            if not pending:
                break
            episodes = job.agent.rollout(
                [job.intents[i] for i in pending],
                job.environment,
                feedback=[avoid[i] for i in pending],
                seed=step_seed(job.seed, 1000 + trial),
            )
            still = []
            for i, episode, score in zip(pending, episodes, job.scores(episodes), strict=True):
                attempts[i].append((episode, score))
                if score >= self.threshold:
                    continue
                feedback = episode.env.feedback()
                if feedback is not None and feedback not in avoid[i]:
                    avoid[i].append(feedback)
                still.append(i)
            pending = still
        out = []
        for tries in attempts:
            passed = tries[-1][1] >= self.threshold
            chosen = tries[-1] if passed or self.final == "last" else max(tries, key=lambda t: t[1])
            out.append(_executed(chosen[0], [e for e, _ in tries], score=chosen[1]))
        return out


@dataclass
class _Node:
    actions: tuple[str, ...]
    parent: _Node | None = None
    children: dict[str, _Node] = field(default_factory=dict)
    visits: int = 0
    total: float = 0.0
    expanded: bool = False
    terminal: bool = False  # known after the node's first simulation
    best: tuple[float, tuple[str, ...]] | None = None  # best finished simulation below

    @property
    def mean(self) -> float:
        return self.total / self.visits if self.visits else 0.0


@dataclass
class _Tree:
    intent: Any
    root: _Node = field(default_factory=lambda: _Node(actions=()))
    env_steps: int = 0
    model_calls: int = 0
    rm_calls: int = 0
    simulations: int = 0


class MCTS(Planner):
    """UCT over action sequences, with the agent as expansion prior and rollout policy.

    Per simulation: select by UCT (unvisited children first) down to a leaf;
    expand it with `expand_k` actions sampled from the agent (duplicates merge,
    the most sampled is simulated first); finish the episode with the agent,
    at most `horizon` steps from the start; its value is the reward model's
    score of the finished trajectory, backed up the path. The executed
    trajectory follows the most visited children from the root, then the best
    scored simulation below the last of them (already played: no extra calls).
    States are rebuilt by replaying actions on a fresh env, and those replayed
    steps count as env steps.
    """

    name = "mcts"

    def __init__(
        self,
        simulations: int = 12,
        c_uct: float = 1.0,
        horizon: int = MAX_STEPS,
        expand_k: int = 3,
    ) -> None:
        _positive("simulations", simulations)
        _positive("expand_k", expand_k)
        if not 1 <= horizon <= MAX_STEPS:
            raise ValueError(f"horizon must be between 1 and {MAX_STEPS}, got {horizon}")
        if c_uct < 0:
            raise ValueError(f"c_uct must be >= 0, got {c_uct}")
        self.simulations, self.c_uct, self.horizon, self.expand_k = (
            simulations,
            c_uct,
            horizon,
            expand_k,
        )

    def budget(self) -> dict[str, Any]:
        return {
            "simulations": self.simulations,
            "c_uct": self.c_uct,
            "horizon": self.horizon,
            "expand_k": self.expand_k,
        }

    def _select(self, node: _Node) -> _Node:
        while node.expanded and not node.terminal and node.children:
            children = list(node.children.values())
            unvisited = [c for c in children if c.visits == 0]
            if unvisited:
                return unvisited[0]
            log_n = math.log(node.visits)
            node = max(children, key=lambda c: c.mean + self.c_uct * math.sqrt(log_n / c.visits))
        return node

    def _plan(self, job: _Job) -> list[PlanResult]:
        agent, environment, seed = job.agent, job.environment, job.seed
        trees = [_Tree(intent) for intent in job.intents]
        for sim in range(self.simulations):
            leaves = [self._select(tree.root) for tree in trees]
            runs: dict[int, Episode] = {}  # tree index -> the episode this simulation plays
            # expansion: k sampled actions for each new leaf, one batched call for all trees
            growing: dict[int, Episode] = {}
            for k, leaf in enumerate(leaves):
                if leaf.expanded or leaf.terminal:
                    continue
                state = Episode.replay(
                    environment, trees[k].intent, leaf.actions, max_steps=self.horizon
                )
                leaf.expanded = True
                if state.done:
                    leaf.terminal, runs[k] = True, state
                else:
                    growing[k] = state
            samples = agent.sample_actions(
                list(growing.values()), self.expand_k, step_seed(seed, 2 * sim)
            )
            for (k, state), actions in zip(growing.items(), samples, strict=True):
                trees[k].model_calls += self.expand_k
                leaf = leaves[k]
                for action, _ in Counter(actions).most_common():
                    leaf.children[action] = _Node(actions=(*leaf.actions, action), parent=leaf)
                leaves[k] = next(iter(leaf.children.values()))
                state.apply(leaves[k].actions[-1])
                runs[k] = state
            known = []  # terminal leaves seen before: their value needs no new calls
            for k, leaf in enumerate(leaves):
                if k in runs:
                    continue
                if leaf.terminal and leaf.best is not None:
                    known.append(k)
                else:
                    runs[k] = Episode.replay(
                        environment, trees[k].intent, leaf.actions, max_steps=self.horizon
                    )
            for k, episode in runs.items():
                if episode.done:
                    leaves[k].terminal = True
            # simulation: the agent finishes every episode, all trees in lockstep
            episodes = list(runs.values())
            started = [len(e.actions) for e in episodes]
            agent.finish(episodes, seed=step_seed(seed, 2 * sim + 1))
            scores = job.scores(episodes)
            for k, episode, start, score in zip(runs, episodes, started, scores, strict=True):
                tree = trees[k]
                tree.env_steps += episode.steps
                tree.model_calls += len(episode.actions) - start
                tree.rm_calls += 1
                tree.simulations += 1
                self._backup(leaves[k], score, tuple(episode.actions))
            for k in known:
                value, actions = leaves[k].best  # type: ignore[misc]
                self._backup(leaves[k], value, actions)
        return [self._execute(tree, environment) for tree in trees]

    @staticmethod
    def _backup(leaf: _Node, value: float, actions: tuple[str, ...]) -> None:
        node: _Node | None = leaf
        while node is not None:
            node.visits += 1
            node.total += value
            if node.best is None or value > node.best[0]:
                node.best = (value, actions)
            node = node.parent

    def _execute(self, tree: _Tree, environment: Environment) -> PlanResult:
        node = tree.root
        while node.children:
            visited = [c for c in node.children.values() if c.visits]
            if not visited:
                break
            node = max(visited, key=lambda c: (c.visits, c.mean))
        assert node.best is not None, "every simulated path has a finished trajectory"
        score, actions = node.best
        episode = Episode.replay(environment, tree.intent, actions, max_steps=self.horizon)
        return _result(
            episode,
            env_steps=tree.env_steps,
            model_calls=tree.model_calls,
            rm_calls=tree.rm_calls,
            episodes=tree.simulations,
            score=score,
        )


def plain() -> Plain:
    """The sampled policy (the baseline)."""
    return Plain()


def best_of_n(n: int = 8) -> BestOfN:
    return BestOfN(n)


def reflexion(
    trials: int = 3, threshold: float = 0.0, final: Literal["best", "last"] = "best"
) -> Reflexion:
    return Reflexion(trials, threshold, final)


def mcts(
    simulations: int = 12, c_uct: float = 1.0, horizon: int = MAX_STEPS, expand_k: int = 3
) -> MCTS:
    return MCTS(simulations, c_uct, horizon, expand_k)


def evaluate(
    planner: Planner,
    agent: Agent,
    reward_model: RewardScorer | None,
    intents: Sequence[Any],
    environment: Environment,
    *,
    seed: int = 0,
    keep_results: bool = False,
) -> dict[str, Any]:
    """Run the planner on every intent; mean reward, success rate and costs per intent."""
    if not intents:
        raise ValueError("intents is empty: nothing to evaluate")
    started = time.monotonic()
    results = planner.run(agent, reward_model, intents, environment, seed=seed)
    n = len(results)
    figures: dict[str, Any] = {
        "planner": planner.name,
        "budget": planner.budget(),
        "intents": n,
        "seed": seed,
        "mean_reward": sum(r.reward for r in results) / n,
        "success_rate": sum(r.success for r in results) / n,
        "mean_env_steps": sum(r.env_steps for r in results) / n,
        "mean_model_calls": sum(r.model_calls for r in results) / n,
        "mean_rm_calls": sum(r.rm_calls for r in results) / n,
        "mean_episodes": sum(r.episodes for r in results) / n,
        "seconds": time.monotonic() - started,
    }
    if keep_results:
        figures["results"] = [r.as_dict() for r in results]
    return figures


# --- for the flows: a planner against the plain policy, and the plans as rows ---

PLAN_SCHEMA = pa.schema(
    [
        ("intent", pa.string()),
        ("reward", pa.float64()),
        ("success", pa.bool_()),
        *((cost, pa.int64()) for cost in ("env_steps", "model_calls", "rm_calls", "episodes")),
        ("actions", pa.list_(pa.string())),
        ("trajectory", pa.string()),
        ("score", pa.float64()),
    ]
)


def compare(
    planner: Planner,
    agent: Agent,
    reward_model: RewardScorer,
    intents: Sequence[Any],
    environment: Environment,
    *,
    seed: int = 0,
) -> tuple[dict[str, Any], dict[str, Any], list[dict]]:
    """The plain policy and `planner` on the same intents: (plain figures, planner
    figures, the planner's executed plans as rows of PLAN_SCHEMA)."""
    plain_figures = evaluate(plain(), agent, reward_model, intents, environment, seed=seed)
    planned = evaluate(
        planner, agent, reward_model, intents, environment, seed=seed, keep_results=True
    )
    rows = [{k: r[k] for k in PLAN_SCHEMA.names} for r in planned.pop("results")]
    return plain_figures, planned, rows


def comparison_figures(name: str, plain: dict[str, Any], planned: dict[str, Any]) -> dict:
    """`compare`'s figures as a run summary shows them."""
    return {
        "intents": planned["intents"],
        "budget": str(planned["budget"]),
        "success rate: plain policy": plain["success_rate"],
        f"success rate: {name}": planned["success_rate"],
        "mean reward: plain policy": plain["mean_reward"],
        f"mean reward: {name}": planned["mean_reward"],
        "env steps per intent: plain / planner": (
            f"{plain['mean_env_steps']:.1f} / {planned['mean_env_steps']:.1f}"
        ),
        "agent calls per intent: plain / planner": (
            f"{plain['mean_model_calls']:.1f} / {planned['mean_model_calls']:.1f}"
        ),
    }
