"""Accuracy per world task family; the training loop is `flywheel.llm.training`."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

from flywheel.llm.training import train_causal_lm
from flywheel.world.tasks import Task, check

# re-exported for the world's modules that train with it
__all__ = ["accuracy_by_family", "train_causal_lm"]


def accuracy_by_family(tasks: Sequence[Task], answers: Sequence[str]) -> dict[str, float]:
    """Exact-match accuracy per family, plus "all"."""
    hits: dict[str, list[float]] = defaultdict(list)
    for task, answer in zip(tasks, answers, strict=True):
        score = check(task, answer)
        hits[task.family].append(score)
        hits["all"].append(score)
    return {family: sum(v) / len(v) for family, v in sorted(hits.items())}
