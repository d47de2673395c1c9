"""A grid walk as an ARMAP `Environment`: a worked example of wrapping one's own environment.

A 5x5 grid with a few walls; the agent starts in the middle and is asked to
`go to <x> <y>`. Actions: `up`, `down`, `left`, `right` (x grows to the right,
y upwards) and `stop`; a move into a wall or off the grid, or text that is no
action, costs a step and changes nothing. The episode ends at `stop` or after
`max_steps`. Score: 0 without a stop, else 1 minus the distance (in steps,
walls ignored) from where it stopped to the goal over the largest distance; 1
is success. ARMAP's refinement: a trajectory that stopped fulfils `go to` the
cell where it stopped. Reflexion's feedback: the cell a failed attempt stopped
at, which the retry's prompt lists as `avoid`.

The observation is the agent's whole prompt:
`task: go to 4 1\\nat 2 2 moves up left down avoid 4 0\\naction: `; the agent
writes the action and a newline.

Also here: a noisy expert and `train_grid_agent`, which trains a tiny char-level
Llama on the expert's (prompt, action) pairs, so the example has an agent.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flywheel.synthesis.environment import TaskParseError

SIZE = 5
START = (2, 2)
MAX_STEPS = 8
MOVES = {"up": (0, 1), "down": (0, -1), "left": (-1, 0), "right": (1, 0)}
ACTIONS = (*MOVES, "stop")
_GOAL = re.compile(r"(?:go to )?(\d+) (\d+)")


@dataclass(frozen=True)
class Goal:
    x: int
    y: int

    @property
    def cell(self) -> tuple[int, int]:
        return (self.x, self.y)


def make_walls(seed: int = 0, count: int = 3) -> tuple[tuple[int, int], ...]:
    """`count` wall cells, never the start nor next to it (every cell stays reachable)."""
    rng = random.Random(seed)
    near = {START, *((START[0] + dx, START[1] + dy) for dx, dy in MOVES.values())}
    free = [(x, y) for x in range(SIZE) for y in range(SIZE) if (x, y) not in near]
    return tuple(sorted(rng.sample(free, count)))


def parse_action(text: str) -> str | None:
    """The action a text names (its first word), or None when it names none."""
    words = text.strip().lower().split()
    return words[0] if words and words[0] in ACTIONS else None


class GridEnvironment:
    """The grid walk over one wall layout; an instance also holds one episode once `reset`."""

    name = "grid"
    max_steps = MAX_STEPS

    def __init__(self, walls: Sequence[tuple[int, int]] | None = None) -> None:
        self.walls = tuple(sorted(walls)) if walls is not None else make_walls()
        if START in self.walls:
            raise ValueError(f"walls: {START} is the start cell and cannot be a wall")
        self.task: Goal | None = None
        self.avoid: tuple[str, ...] = ()
        self.position = START
        self.moves: list[str] = []
        self.stopped = False

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "size": SIZE, "walls": [list(w) for w in self.walls]}

    def fresh(self) -> GridEnvironment:
        return GridEnvironment(self.walls)

    def open_cells(self) -> list[tuple[int, int]]:
        return [(x, y) for x in range(SIZE) for y in range(SIZE) if (x, y) not in self.walls]

    # --- the task source ---

    def sample_task(self, rng: random.Random) -> Goal:
        return Goal(*rng.choice([c for c in self.open_cells() if c != START]))

    def task_prompt(self, rng: random.Random, shown: int) -> str:
        cells = rng.sample(self.open_cells(), min(shown, len(self.open_cells())))
        return (
            f"grid {SIZE}x{SIZE}, open cells: {', '.join(f'{x} {y}' for x, y in cells)}\n"
            "write a task to walk to one of them, as: go to (x) (y)\ntask: "
        )

    def parse_task(self, text: str) -> Goal:
        m = _GOAL.search(text.lower())
        if m is None:
            raise TaskParseError("no 'go to <x> <y>' in the answer")
        x, y = int(m.group(1)), int(m.group(2))
        if not (0 <= x < SIZE and 0 <= y < SIZE):
            raise TaskParseError(
                f"cell {x} {y} is outside the {SIZE}x{SIZE} grid (x and y from 0 to {SIZE - 1})"
            )
        if (x, y) in self.walls:
            raise TaskParseError(f"cell {x} {y} is a wall")
        return Goal(x, y)

    def task_text(self, task: Goal) -> str:
        return f"go to {task.x} {task.y}"

    # --- one episode ---

    def _open(self) -> list[str]:
        return [name for name in MOVES if self._moved(name) != self.position]

    def _moved(self, name: str) -> tuple[int, int]:
        dx, dy = MOVES[name]
        x, y = self.position[0] + dx, self.position[1] + dy
        inside = 0 <= x < SIZE and 0 <= y < SIZE and (x, y) not in self.walls
        return (x, y) if inside else self.position

    def observation(self) -> str:
        if self.task is None:
            raise RuntimeError("no episode: call reset(task) first")
        avoid = f" avoid {','.join(self.avoid)}" if self.avoid else ""
        x, y = self.position
        return (
            f"task: {self.task_text(self.task)}\n"
            f"at {x} {y} moves {' '.join(self._open())}{avoid}\naction: "
        )

    def reset(self, task: Goal, feedback: Sequence[str] = ()) -> str:
        self.task, self.avoid = task, tuple(feedback)
        self.position, self.moves, self.stopped = START, [], False
        return self.observation()

    def step(self, action: str) -> tuple[str, bool]:
        if self.task is None:
            raise RuntimeError("no episode: call reset(task) first")
        if self.stopped or len(self.moves) >= MAX_STEPS:
            raise RuntimeError("episode is over: call reset(task)")
        name = parse_action(action)
        if name == "stop":
            self.stopped = True
            self.moves.append("stop")
        elif name is not None and self._moved(name) != self.position:
            self.position = self._moved(name)
            self.moves.append(name)
        else:
            self.moves.append("noop")
        return self.observation(), self.stopped or len(self.moves) >= MAX_STEPS

    def score(self, task: Goal | None = None) -> float:
        goal = task if task is not None else self.task
        if goal is None:
            raise RuntimeError("no episode: call reset(task) first")
        if not self.stopped:
            return 0.0
        distance = abs(self.position[0] - goal.x) + abs(self.position[1] - goal.y)
        return 1.0 - distance / (2 * (SIZE - 1))

    def refine(self, rng: random.Random) -> Goal | None:
        return Goal(*self.position) if self.stopped else None

    def feedback(self) -> str | None:
        return f"{self.position[0]} {self.position[1]}" if self.stopped else None

    def trajectory_text(self) -> str:
        x, y = self.position
        outcome = f"|stopped at {x} {y}" if self.stopped else f"|no stop, at {x} {y}"
        return ">".join(self.moves) + outcome


# --- a noisy expert and a tiny agent trained on it ---


def _distances(env: GridEnvironment, goal: Goal) -> dict[tuple[int, int], int]:
    """Steps to the goal from every open cell, around the walls (breadth-first)."""
    out = {goal.cell: 0}
    frontier = [goal.cell]
    while frontier:
        nxt = []
        for x, y in frontier:
            for dx, dy in MOVES.values():
                cell = (x + dx, y + dy)
                if cell in out or cell in env.walls:
                    continue
                if 0 <= cell[0] < SIZE and 0 <= cell[1] < SIZE:
                    out[cell] = out[(x, y)] + 1
                    nxt.append(cell)
        frontier = nxt
    return out


def expert_action(env: GridEnvironment, rng: random.Random, slip: float = 0.25) -> str:
    """A shortest-path step to the goal, `stop` there; with `slip`, a random action."""
    assert env.task is not None
    if rng.random() < slip:
        return rng.choice(ACTIONS)
    if env.position == env.task.cell:
        return "stop"
    distances = _distances(env, env.task)
    return min(env._open(), key=lambda m: distances.get(env._moved(m), 99))


def expert_examples(
    walls: Sequence[tuple[int, int]] | None = None, slip: float = 0.25
) -> Callable[[random.Random], tuple[str, str]]:
    """A sampler of (prompt, action) pairs from fresh expert episodes, for `train_causal_lm`."""
    environment = GridEnvironment(walls)
    buffer: list[tuple[str, str]] = []

    def sample(rng: random.Random) -> tuple[str, str]:
        while not buffer:
            env = environment.fresh()
            avoid = [f"{x} {y}" for x, y in rng.sample(env.open_cells(), rng.choice([0, 0, 1]))]
            observation, done = env.reset(env.sample_task(rng), avoid), False
            while not done:
                action = expert_action(env, rng, slip)
                buffer.append((observation, action))
                observation, done = env.step(action)
        return buffer.pop(rng.randrange(len(buffer)))

    return sample


def held_out_tasks(n: int, seed: int = 1_000_000_007) -> tuple[GridEnvironment, list[Goal]]:
    """The default grid and n goals drawn with a seed of their own."""
    environment = GridEnvironment()
    rng = random.Random(seed)
    return environment, [environment.sample_task(rng) for _ in range(n)]


def train_grid_agent(
    out_dir: str | Path, steps: int = 300, seed: int = 0, batch_size: int = 16
) -> Path:
    """A tiny char-level Llama trained `steps` steps on the expert; saved to out_dir."""
    from flywheel.llm.training import train_causal_lm
    from flywheel.world.models import char_tokenizer, new_tiny_model, save_tiny

    model = new_tiny_model("small", seed=seed)
    train_causal_lm(
        model,
        char_tokenizer(),
        expert_examples(),
        steps=steps,
        batch_size=batch_size,
        lr=6e-3,
        seed=seed,
    )
    return save_tiny(model, out_dir)
