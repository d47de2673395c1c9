"""Measuring an Adapters Selector on held-out rows: routing accuracy per selector, and a
scorer's mean score per system (routed adapters, oracle routing, the base model and any
baseline) per task and overall, with one row per (system, input).

A scorer takes (prompts, outputs, answers) and returns one score per output in [0, 1]
for the built-in ones: exact match (surrounding whitespace aside) or ROUGE-L F1; a
caller may pass any other, e.g. a registered reward model's score or a task checker.
`evaluate_run` adds, after an add, the old tasks routed before and after it, and
`run_summary` the figures a run reports.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flywheel.selectors.adapters import AdapterLibrary, SelectorInputError, load_base
from flywheel.selectors.kmeans import AdaptersSelector, generate_greedy, routing_accuracy
from flywheel.selectors.library_version import MULTITASK
from flywheel.store import ModelNotRegistered, ModelRef, read_model
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


def reward_model(name: str) -> ModelRef:
    """A registered reward model (Bradley-Terry or ensemble), or an error with the fix."""
    try:
        reward = read_model(name)
    except ModelNotRegistered as e:
        raise ValueError(
            f"scorer_reward_model: {e}; train one with reward/train or pick another scorer"
        ) from e
    if reward.meta["kind"] not in ("bradley-terry", "ensemble"):
        raise ValueError(
            f"scorer_reward_model: {reward.name}@{reward.version} is a {reward.meta['kind']!r} "
            "model, not a reward model; train one with reward/train"
        )
    return reward


def check_scorer(scorer: str, scorer_reward_model: str | None) -> None:
    """A reward model is named exactly when the scorer is 'reward_model', and registered."""
    if (scorer == "reward_model") != (scorer_reward_model is not None):
        raise ValueError(
            "scorer_reward_model: give it exactly when scorer is 'reward_model' (scorer is "
            f"{scorer!r})"
        )
    if scorer_reward_model is not None:
        reward_model(scorer_reward_model)


def reward_scorer(reward: ModelRef) -> Scorer:
    """A registered reward model's score of each (prompt, output)."""
    from flywheel.reward_models.bradley_terry import RewardModel
    from flywheel.reward_models.ensemble import EnsembleRewardModel

    model = (EnsembleRewardModel if reward.meta["kind"] == "ensemble" else RewardModel)(reward.path)

    def score(prompts, outputs, answers) -> list[float]:
        scores = model.score(list(prompts), list(outputs))
        return scores["mean"] if isinstance(scores, dict) else list(scores)

    return score


def answer_tokens(base_model: str, answers: Sequence[str]) -> int:
    """The longest answer's length in the base model's tokens."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base_model, local_files_only=True)
    return max(len(tok(a, add_special_tokens=False)["input_ids"]) for a in answers)


def adapter_baseline(base_model: str, adapter: Path, max_new_tokens: int) -> Generate:
    """Greedy generation with one adapter on the base model (the multi-task baseline)."""

    def generate(prompts: list[str]) -> list[str]:
        from peft import PeftModel

        base, tok = load_base(base_model)
        model = PeftModel.from_pretrained(base, str(adapter))
        return generate_greedy(model.eval(), tok, prompts, max_new_tokens)

    return generate


def evaluate_run(
    systems: Mapping[str, AdaptersSelector],
    data: EvalSet,
    scorer: Scorer,
    max_new_tokens: int,
    label: Callable[[str], dict[str, str]],
    *,
    before: tuple[str | Path, str | Path, Sequence[str]] | None = None,
    added: str | None = None,
) -> tuple[dict[str, Any], list[dict]]:
    """`evaluate_selectors` on `data`, with the library's multi-task adapter as a baseline
    where it has one; after an add of `added`, also the old tasks routed by the selectors
    before it (`before`: the previous selector's folder, its library's folder and kinds)
    against the updated ones. Returns (figures, rows), each row with `label(task)`."""
    library = next(iter(systems.values())).library
    baselines = {}
    if (multitask := library.folder / MULTITASK).is_dir():
        baselines["multi-task adapter"] = adapter_baseline(
            library.base_model, multitask, max_new_tokens
        )
    result = evaluate_selectors(
        systems, data, scorer, max_new_tokens=max_new_tokens, baselines=baselines
    )
    rows = [{**r, **label(r["task"])} for r in result.pop("rows")]
    figures: dict[str, Any] = dict(result)
    if before is not None:
        folder, library_folder, kinds = before
        old = data.subset(lambda t: t != added)
        previous_library = AdapterLibrary(library_folder)
        for kind in kinds:
            previous = AdaptersSelector.load(Path(folder) / kind, previous_library)
            got = evaluate_selectors(
                {kind: previous},
                old,
                scorer,
                max_new_tokens=max_new_tokens,
                oracle=False,
                base=False,
            )
            after = [
                r["score"]
                for r in rows
                if r["system"] == f"routed {kind}/updated" and r["task"] != added
            ]
            figures[f"old tasks routed accuracy {kind}"] = {
                "before": got["task_accuracy"][f"routed {kind}"],
                "after": sum(after) / max(1, len(after)),
            }
    return figures, rows


def run_summary(figures: Mapping[str, Any], *, mode: str, adapters: str, selector: str) -> dict:
    """A run's summary: what it did and on which tasks, the versions it published, routing
    and task accuracy per system, the old tasks before and after an add, the held-out
    count and the evaluation dataset."""
    return {
        "mode": mode,
        "tasks": figures["tasks_dataset"],
        "scorer": figures["scorer"],
        "adapters": adapters,
        "selector": selector,
        **{f"routing accuracy {k}": acc["all"] for k, acc in figures["routing_accuracy"].items()},
        **{f"task accuracy {k}": acc for k, acc in figures["task_accuracy"].items()},
        **{
            f"{key}: {when}": value
            for key, entry in figures.items()
            if key.startswith("old tasks")
            for when, value in entry.items()
        },
        "held-out tasks": figures["eval_tasks"],
        "evaluation dataset": figures["dataset"],
    }


__all__ = [
    "SCORERS",
    "EvalSet",
    "Generate",
    "Scorer",
    "adapter_baseline",
    "answer_tokens",
    "check_scorer",
    "evaluate_run",
    "evaluate_selectors",
    "exact_match",
    "reward_model",
    "reward_scorer",
    "rouge_l_f",
    "run_summary",
]
