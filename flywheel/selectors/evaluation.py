"""Measuring an Adapters Selector on held-out rows: routing accuracy per selector, and a
scorer's mean score per system (routed adapters, oracle routing, the base model and any
baseline) per task and overall, with one row per (system, input).

A scorer takes (prompts, outputs, answers) and returns one score per output in [0, 1]
for the built-in ones: exact match (surrounding whitespace aside) or ROUGE-L F1; a
caller may pass any other, e.g. a reward model's score or a task checker.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from flywheel.selectors.adapters import SelectorInputError
from flywheel.selectors.kmeans import AdaptersSelector, routing_accuracy
from flywheel.synthesis.rouge import rouge_l

Scorer = Callable[[Sequence[str], Sequence[str], Sequence[str]], list[float]]
Generate = Callable[[list[str]], list[str]]  # a baseline: prompts -> outputs, in order


def exact_match(
    prompts: Sequence[str], outputs: Sequence[str], answers: Sequence[str]
) -> list[float]:
    """1.0 where the output is the answer (surrounding whitespace aside), else 0.0."""
    return [float(o.strip() == a.strip()) for o, a in zip(outputs, answers, strict=True)]


def rouge_l_f(
    prompts: Sequence[str], outputs: Sequence[str], answers: Sequence[str]
) -> list[float]:
    """ROUGE-L F1 between output and answer (lower-cased words): partial credit."""
    return [rouge_l(o, a) for o, a in zip(outputs, answers, strict=True)]


SCORERS: dict[str, Scorer] = {"exact_match": exact_match, "rouge_l": rouge_l_f}


@dataclass
class EvalSet:
    """Held-out inputs: the prompt, the task it belongs to and its reference answer."""

    prompts: list[str]
    tasks: list[str]
    answers: list[str]

    def __post_init__(self) -> None:
        if not len(self.prompts) == len(self.tasks) == len(self.answers):
            raise SelectorInputError(
                f"eval set: {len(self.prompts)} prompts, {len(self.tasks)} tasks and "
                f"{len(self.answers)} answers; give one task and answer per prompt"
            )

    def subset(self, keep: Callable[[str], bool]) -> EvalSet:
        """The rows whose task `keep` accepts."""
        idx = [i for i, t in enumerate(self.tasks) if keep(t)]
        return EvalSet(
            [self.prompts[i] for i in idx],
            [self.tasks[i] for i in idx],
            [self.answers[i] for i in idx],
        )


def _means(tasks: Sequence[str], scores: Sequence[float]) -> dict[str, float]:
    by: dict[str, list[float]] = {}
    for task, score in zip(tasks, scores, strict=True):
        by.setdefault(task, []).append(score)
        by.setdefault("all", []).append(score)
    return {task: sum(v) / len(v) for task, v in sorted(by.items())}


def evaluate_selectors(
    systems: Mapping[str, AdaptersSelector],
    data: EvalSet,
    scorer: Scorer,
    *,
    max_new_tokens: int,
    baselines: Mapping[str, Generate] | None = None,
    oracle: bool = True,
    base: bool = True,
) -> dict:
    """Route and generate `data` with each system (its own routes), then oracle routing
    (each row to its task's adapter) and the base model alone on the last system's
    adapters, then each baseline; score every output with `scorer`.

    Returns {"routing_accuracy": {key: {task: share, "all": share}},
    "task_accuracy": {system: mean score}, "task_accuracy_by_task": {system: {task:
    mean, "all": mean}}, "rows": [{system, task, prompt, answer, route, output, score}]}.
    Systems are named `routed <key>`.
    """
    if not systems:
        raise SelectorInputError("systems: nothing to evaluate; give at least one selector")
    if not data.prompts:
        raise SelectorInputError("eval set: no held-out rows to evaluate on")
    out: dict = {
        "routing_accuracy": {},
        "task_accuracy": {},
        "task_accuracy_by_task": {},
        "rows": [],
    }

    def record(system: str, outputs: list[str], routes: Sequence[str] | None) -> None:
        scores = [float(s) for s in scorer(data.prompts, outputs, data.answers)]
        if len(scores) != len(outputs):
            raise SelectorInputError(
                f"scorer: {len(scores)} scores for {len(outputs)} outputs; it must score each"
            )
        for i, (output, score) in enumerate(zip(outputs, scores, strict=True)):
            out["rows"].append(
                {
                    "system": system,
                    "task": data.tasks[i],
                    "prompt": data.prompts[i],
                    "answer": data.answers[i],
                    "route": routes[i] if routes is not None else None,
                    "output": output,
                    "score": score,
                }
            )
        by_task = _means(data.tasks, scores)
        out["task_accuracy_by_task"][system] = by_task
        out["task_accuracy"][system] = by_task["all"]

    generator = None
    for key, system in systems.items():
        generator = system.generator()
        routes = generator.route(data.prompts)
        out["routing_accuracy"][key] = routing_accuracy(routes, data.tasks)
        outputs = generator.generate(data.prompts, max_new_tokens=max_new_tokens, routes=routes)
        record(f"routed {key}", outputs, routes)
    assert generator is not None
    if oracle:
        outputs = generator.generate(data.prompts, max_new_tokens=max_new_tokens, routes=data.tasks)
        record("oracle routing", outputs, data.tasks)
    if base:
        record(
            "base model", generator.generate_base(data.prompts, max_new_tokens=max_new_tokens), None
        )
    for name, generate in (baselines or {}).items():
        record(name, list(generate(list(data.prompts))), None)
    return out


__all__ = [
    "SCORERS",
    "EvalSet",
    "Generate",
    "Scorer",
    "evaluate_selectors",
    "exact_match",
    "rouge_l_f",
]
