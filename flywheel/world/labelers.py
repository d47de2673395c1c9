"""The world's oracle as a `flywheel.reward_models.labelers.Labeler`: it knows every
task's answer, so it grades both responses of a pair and prefers the better one. UGDA
takes any labeler; `reward/relabel` passes this one for world prompts."""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from typing import Literal

from flywheel.reward_models.labelers import (
    Labeler,
    check_pairs,
    failure_row,
    log_outcome,
    preference_row,
)
from flywheel.world.tasks import SEP, Task, check, parse_instruction


def task_of_prompt(prompt: str) -> Task | None:
    """The world task a prompt asks (its last line, `<family> <letters>=`), or None."""
    line = prompt.rstrip().splitlines()[-1] if prompt.strip() else ""
    if not line.endswith(SEP):
        return None
    return parse_instruction(line[: -len(SEP)])


class WorldOracleLabeler(Labeler):
    """Grades both responses; the better grade wins.

    grade = `tasks.check` (1 right, 0 wrong) + similarity to the correct answer
    (difflib ratio, 0..1). A correct answer (grade 2) always beats a wrong one
    (below 1), and of two wrong answers (most pairs of a weak policy) the near miss
    beats the noise: a reward model should rank it higher. `tie_break="none"`
    grades by `tasks.check` alone. Pairs whose grades differ by no more than
    `min_margin` (always: equal grades, e.g. two wrong digits for `count`) are not
    preferences: they become failure rows with error "tie: ...", so they are
    counted and kept out of training. `min_margin` (below 1, so it never ties a
    right and a wrong answer) drops the wrong-vs-wrong pairs too close to call.
    """

    def __init__(
        self, tie_break: Literal["similarity", "none"] = "similarity", min_margin: float = 0.0
    ) -> None:
        if tie_break not in ("similarity", "none"):
            raise ValueError(f"tie_break must be 'similarity' or 'none', got {tie_break!r}")
        if not 0 <= min_margin < 1:
            raise ValueError(f"min_margin must be in [0, 1), got {min_margin}")
        self.tie_break = tie_break
        self.min_margin = min_margin
        self.name = "world-oracle"

    def grade(self, task: Task, response: str) -> float:
        if self.tie_break == "none":
            return check(task, response)
        return check(task, response) + _similarity(response, task.answer)

    def label(self, pairs: Sequence[dict]) -> tuple[list[dict], list[dict]]:
        check_pairs(pairs)
        labeled: list[dict] = []
        failures: list[dict] = []
        for pair in pairs:
            task = task_of_prompt(pair["prompt"])
            if task is None:
                failures.append(
                    failure_row(
                        pair,
                        pair["prompt"],
                        "not a world task: the prompt's last line is not '<family> <letters>='",
                        self.name,
                    )
                )
                continue
            a = self.grade(task, pair["response_a"])
            b = self.grade(task, pair["response_b"])
            if abs(a - b) > self.min_margin:
                labeled.append(preference_row(pair, "a" if a > b else "b", self.name))
            else:
                graded = f"grade a={a:.3f} b={b:.3f} (min_margin {self.min_margin})"
                failures.append(failure_row(pair, graded, f"tie: {graded}", self.name))
        log_outcome(self.name, labeled, failures)
        return labeled, failures


def _similarity(response: str, answer: str) -> float:
    return difflib.SequenceMatcher(None, response.strip(), answer).ratio()
