"""The world's task families as the Adapters Selector's tasks: which families a run
trains on, each family's (prompt, answer, task) rows, and the held-out evaluation on
fresh tasks with the world's checker as the exact-match scorer."""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field

from flywheel.selectors.evaluation import EvalSet, Scorer
from flywheel.selectors.tasks import TasksLayout
from flywheel.store import DatasetRef
from flywheel.world.bootstrap import held_out_tasks
from flywheel.world.tasks import FAMILIES, MAX_LEN, Task, check, sample_tasks

WORLD = "world"  # the tasks' source recorded with a selector trained on the world's tasks
MAX_NEW_TOKENS = MAX_LEN + 2  # the longest answer and an end token, with a token to spare


def check_families(
    tasks: Sequence[str] | None,
    families: Sequence[str] | None,
    *,
    add: str | None,
    need: int,
    samples_per_task: int,
) -> list[str]:
    """The families a run trains on (`tasks` or `families`, or all), each known and named
    once, `add` a known family, and `need` (k * per_centre) rows within each family's."""
    if tasks is not None and families is not None:
        raise ValueError("tasks, families: give one of them (both name the world's families)")
    field = "tasks" if tasks is not None else "families"
    chosen = tasks if tasks is not None else families
    names = list(FAMILIES) if chosen is None else list(chosen)
    if not names:
        raise ValueError(f"{field}: empty; give some of {sorted(FAMILIES)} or null for all")
    unknown = [f for f in names if f not in FAMILIES]
    if unknown:
        raise ValueError(f"{field}: unknown task family {unknown}; known: {sorted(FAMILIES)}")
    if len(set(names)) != len(names):
        raise ValueError(f"{field}: {names} names a family twice; list each once")
    if add is not None and add not in FAMILIES:
        raise ValueError(f"add: unknown task family {add!r}; known: {sorted(FAMILIES)}")
    if need > samples_per_task:
        raise ValueError(
            f"k * per_centre = {need} is more than samples_per_task="
            f"{samples_per_task}; lower k or per_centre, or raise samples_per_task"
        )
    return names


def family_tasks(family: str, n: int, seed: int) -> list[Task]:
    # one generator per family: a family's data is the same whichever others run with it
    return sample_tasks(n, random.Random(f"{seed}-{family}"), [family])


def family_rows(families: Sequence[str], n: int, seed: int) -> list[dict]:
    """`n` (task, id, prompt, answer) rows per family."""
    return [
        {"task": t.family, "id": t.id, "prompt": t.prompt, "answer": t.answer}
        for f in families
        for t in family_tasks(f, n, seed)
    ]


def held_out_eval(n: int, families: Sequence[str]) -> tuple[EvalSet, Scorer]:
    """Fresh held-out tasks of `families` (HELD_OUT_TASK_SEED, a seed the task data never
    uses) out of `n` of all families, and the world's checker as their scorer."""
    tasks = [t for t in held_out_tasks(n) if t.family in families]
    data = EvalSet([t.prompt for t in tasks], [t.family for t in tasks], [t.answer for t in tasks])
    by_prompt = {t.prompt: t for t in tasks}  # a prompt states its task in full

    def world_check(prompts, outputs, answers) -> list[float]:
        return [check(by_prompt[p], o) for p, o in zip(prompts, outputs, strict=True)]

    return data, world_check


@dataclass(frozen=True)
class WorldTasks:
    """The world's families as a `flywheel.selectors.tasks.TaskSource`: every row trains
    (evaluation is on fresh held-out tasks), and the rows a run writes keep a `family`
    column beside `task`."""

    families: Sequence[str] | None
    samples_per_task: int
    eval_tasks: int
    seed: int
    name: str = WORLD
    layout: TasksLayout = field(init=False)

    def __post_init__(self) -> None:
        layout = TasksLayout(eval_fraction=None, seed=self.seed, labels=("task", "family"))
        object.__setattr__(self, "layout", layout)

    def choose(
        self, tasks: Sequence[str] | None, add: str | None, remove: str | None, need: int
    ) -> tuple[None, list[str]]:
        families = self.families
        return None, check_families(
            tasks, families, add=add, need=need, samples_per_task=self.samples_per_task
        )

    def held_out(self, ref: DatasetRef, names: Sequence[str]) -> tuple[EvalSet, Scorer]:
        return held_out_eval(self.eval_tasks, names)

    def max_new_tokens(self, base_model: str, data: EvalSet) -> int:
        return MAX_NEW_TOKENS

    def rows(self, names: Sequence[str]) -> list[dict]:
        return family_rows(names, self.samples_per_task, self.seed)


__all__ = [
    "MAX_NEW_TOKENS",
    "WORLD",
    "WorldTasks",
    "check_families",
    "family_rows",
    "family_tasks",
    "held_out_eval",
]
