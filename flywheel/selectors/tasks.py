"""A tasks dataset for the Adapters Selector: a store dataset of (prompt, answer, task)
rows, one adapter per task value. Reading it (every column present, every value text,
every task value a valid adapter name), checking which tasks a run may train on, and
splitting each task's rows into training and held-out pairs with a seeded shuffle."""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from flywheel.selectors.adapters import SelectorInputError, check_adapter_name
from flywheel.selectors.evaluation import EvalSet, Scorer, answer_tokens
from flywheel.store import DatasetNotFound, DatasetRef, read_dataset

Pairs = dict[str, list[tuple[str, str]]]  # {task: [(prompt, answer), ...]}


@dataclass(frozen=True)
class TasksLayout:
    """Where a tasks dataset keeps each field, and how its rows are split."""

    prompt: str = "prompt"
    answer: str = "answer"
    task: str = "task"
    # share of each task's rows held out; None: every row trains (evaluation is elsewhere)
    eval_fraction: float | None = 0.2
    seed: int = 0
    # the columns naming a row's task in the rows a run writes (samples, evaluation)
    labels: tuple[str, ...] = ("task",)

    def columns(self) -> dict[str, str]:
        return {"prompt": self.prompt, "answer": self.answer, "task": self.task}

    def label(self, name: str) -> dict[str, str]:
        return {column: name for column in self.labels}


def split_rows(rows: list[dict], eval_fraction: float, seed: int, task: str) -> tuple[list, list]:
    """(train, held-out) rows of one task: a seeded shuffle, at least one row held out."""
    order = list(range(len(rows)))
    random.Random(f"{seed}-{task}").shuffle(order)
    n_eval = max(1, round(eval_fraction * len(rows)))
    return [rows[i] for i in order[n_eval:]], [rows[i] for i in order[:n_eval]]


def read_tasks(
    name: str, version: str | None, layout: TasksLayout
) -> tuple[DatasetRef, dict[str, list[dict]]]:
    """The tasks dataset and its rows by task value, in order of first appearance; every
    column present and every value text, or an error naming the field, row and fix."""
    try:
        ref = read_dataset(name, version)
    except DatasetNotFound as e:
        raise ValueError(
            f"tasks_dataset: {e}; write the tasks with flywheel.store.write_dataset or "
            "`flywheel import`, or leave tasks_dataset null for the world's tasks"
        ) from e
    source = f"tasks_dataset {ref.name}@{ref.version}"
    table = ref.to_arrow()
    cols = layout.columns()
    for field, column in cols.items():
        if column not in table.column_names:
            raise ValueError(
                f"{field}_column: {source} has no column {column!r}; its columns are "
                f"{table.column_names}; set {field}_column to the column holding each row's "
                f"{field}"
            )
    by_task: dict[str, list[dict]] = {}
    for i, row in enumerate(table.select(list(cols.values())).to_pylist()):
        for field, column in cols.items():
            value = row[column]
            if not isinstance(value, str) or (field != "answer" and not value.strip()):
                raise ValueError(
                    f"{field}_column: {source} row {i} has {value!r} in {column!r}; each row "
                    f"needs {field} text: fill or drop the row"
                )
        by_task.setdefault(row[cols["task"]], []).append(
            {"prompt": row[cols["prompt"]], "answer": row[cols["answer"]]}
        )
    for task in by_task:
        try:
            check_adapter_name(task, f"task_column {cols['task']!r} value")
        except SelectorInputError as e:
            raise ValueError(f"{e}: task values name the adapters; rename them") from e
    return ref, by_task


def check_tasks_dataset(
    name: str,
    version: str | None,
    layout: TasksLayout,
    *,
    tasks: Sequence[str] | None,
    add: str | None,
    remove: str | None,
    need: int,
) -> tuple[DatasetRef, list[str]]:
    """The dataset and the task values a run trains on (`tasks`, or all), each with at
    least `need` (k * per_centre) training rows after the held-out split; for a fresh run
    at least 2 of them, for `add` a value of the task column."""
    ref, by_task = read_tasks(name, version, layout)
    column, fraction = layout.task, layout.eval_fraction or 0.0
    values = list(by_task)
    chosen = values if tasks is None else list(tasks)
    unknown = [t for t in chosen if t not in by_task]
    if unknown:
        raise ValueError(
            f"tasks: {unknown} are not values of column {column!r} in {ref.name}@{ref.version}; "
            f"its task values: {values}"
        )
    if len(set(chosen)) != len(chosen):
        raise ValueError(f"tasks: {chosen} names a task twice; list each once")
    if add is None and remove is None and len(chosen) < 2:
        raise ValueError(
            f"tasks: {len(chosen)} task value(s) {chosen} in column {column!r}; the selector "
            "routes between tasks: give a dataset (or `tasks`) with at least 2 task values"
        )
    if add is not None and add not in by_task:
        raise ValueError(
            f"add: {add!r} is not a value of column {column!r} in "
            f"{ref.name}@{ref.version}; its task values: {values}"
        )
    for task in [add] if add is not None else chosen:
        rows = by_task[task]
        train, held = split_rows(rows, fraction, layout.seed, task)
        if len(train) < need or len(rows) < 2:
            raise ValueError(
                f"tasks_dataset: task {task!r} has {len(rows)} rows, {len(train)} for "
                f"training after eval_fraction={fraction} holds out {len(held)}; "
                f"the selector needs k * per_centre = {need} of them: lower k or per_centre "
                "or eval_fraction, or give the task more rows"
            )
    return ref, chosen


def task_pairs(ref: DatasetRef, layout: TasksLayout, names: Sequence[str]) -> tuple[Pairs, Pairs]:
    """({task: training pairs}, {task: held-out pairs}) for `names`, split as the layout
    says (no held-out pairs where its eval_fraction is None)."""
    cols = layout.columns()
    by_task: dict[str, list[dict]] = {}
    for row in ref.to_arrow().select(list(cols.values())).to_pylist():
        if row[cols["task"]] in names:
            by_task.setdefault(row[cols["task"]], []).append(
                {"prompt": row[cols["prompt"]], "answer": row[cols["answer"]]}
            )
    train: Pairs = {}
    held: Pairs = {}
    for name in names:
        rows = by_task.get(name, [])
        if layout.eval_fraction is None:
            fit, out = rows, []
        else:
            fit, out = split_rows(rows, layout.eval_fraction, layout.seed, name)
        train[name] = [(r["prompt"], r["answer"]) for r in fit]
        held[name] = [(r["prompt"], r["answer"]) for r in out]
    return train, held


def task_prompts(ref: DatasetRef, layout: TasksLayout, names: Sequence[str]) -> dict[str, list]:
    """{task: training prompts} for `names`."""
    train, _ = task_pairs(ref, layout, names)
    return {name: [p for p, _ in pairs] for name, pairs in train.items()}


def held_out_set(ref: DatasetRef, layout: TasksLayout, names: Sequence[str]) -> EvalSet:
    """The held-out rows of `names`, task by task."""
    _, held = task_pairs(ref, layout, names)
    rows = [(name, p, a) for name in names for p, a in held[name]]
    return EvalSet([p for _, p, _ in rows], [n for n, _, _ in rows], [a for _, _, a in rows])


class TaskSource(Protocol):
    """Where a run's tasks come from: a store dataset of the user's (`DatasetTasks`) or
    another implementation, such as a generator of tasks with its own evaluation."""

    name: str  # recorded with a selector: an update must name the same source
    layout: TasksLayout

    def choose(
        self, tasks: Sequence[str] | None, add: str | None, remove: str | None, need: int
    ) -> tuple[DatasetRef | None, list[str]]:
        """The dataset (None: written later) and the tasks a run trains on, or an error."""
        ...

    def held_out(self, ref: DatasetRef, names: Sequence[str]) -> tuple[EvalSet, Scorer | None]:
        """The held-out rows of `names`, and the source's own exact-match scorer if any."""
        ...

    def max_new_tokens(self, base_model: str, data: EvalSet) -> int:
        """Generation length for `data`: its longest answer and room to stop."""
        ...


@dataclass(frozen=True)
class DatasetTasks:
    """A store dataset's tasks: each task's rows split into training and held-out rows."""

    name: str
    version: str | None
    layout: TasksLayout

    def choose(
        self, tasks: Sequence[str] | None, add: str | None, remove: str | None, need: int
    ) -> tuple[DatasetRef, list[str]]:
        return check_tasks_dataset(
            self.name, self.version, self.layout, tasks=tasks, add=add, remove=remove, need=need
        )

    def held_out(self, ref: DatasetRef, names: Sequence[str]) -> tuple[EvalSet, None]:
        return held_out_set(ref, self.layout, names), None

    def max_new_tokens(self, base_model: str, data: EvalSet) -> int:
        return answer_tokens(base_model, data.answers) + 2


__all__ = [
    "DatasetTasks",
    "Pairs",
    "TaskSource",
    "TasksLayout",
    "check_tasks_dataset",
    "held_out_set",
    "read_tasks",
    "split_rows",
    "task_pairs",
    "task_prompts",
]
