"""The world's programmatic teacher: REFED's teacher interface answered from world knowledge.

It returns the same payloads an LLM teacher is asked for (dicts matching the
JSON schemas), so REFED validates both the same way. An instruction that is
not a world task gets a plain-text refusal, which fails validation and lands
in the failed dataset like an unparseable LLM answer would.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Sequence

from flywheel.world.tasks import (
    FAMILIES,
    MAX_LEN,
    MIN_LEN,
    SKILLS,
    check,
    make_task,
    parse_instruction,
    solve,
)

NOT_A_TASK = "I cannot analyse this: it is not a task of the world ({instruction!r})."


def _rng(*parts: object) -> random.Random:
    digest = hashlib.sha256("|".join(map(str, parts)).encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


class WorldTeacher:
    """Feedback, new instructions, refinement and judging for world tasks."""

    name = "world"

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed

    def instruction_feedback(
        self, references: Sequence[dict], attempt: int = 0
    ) -> list[dict | str]:
        out: list[dict | str] = []
        for ref in references:
            task = parse_instruction(ref["instruction"])
            if task is None:
                out.append(NOT_A_TASK.format(instruction=ref["instruction"]))
            else:
                out.append({"subject_areas": [task.family], "skills": list(task.skills)})
        return out

    def response_feedback(self, references: Sequence[dict], attempt: int = 0) -> list[dict | str]:
        out: list[dict | str] = []
        for ref in references:
            task = parse_instruction(ref["instruction"])
            if task is None:
                out.append(NOT_A_TASK.format(instruction=ref["instruction"]))
                continue
            out.append(
                {
                    "content_quality": f"the answer is exactly the {task.family} of the letters",
                    "communication": "only the answer: no spaces, no extra words",
                    "instruction_alignment": f"applies {task.family} to all "
                    f"{len(task.letters)} letters, nothing dropped or added",
                }
            )
        return out

    def new_instructions(
        self, requests: Sequence[tuple[dict, str]], n: int, attempt: int = 0
    ) -> list[dict | str]:
        """n new instructions per (reference, feature); feature is 'subject:X' or 'skill:Y'."""
        out: list[dict | str] = []
        for ref, feature in requests:
            task = parse_instruction(ref["instruction"])
            kind, _, value = feature.partition(":")
            if kind == "subject" and value in FAMILIES:
                families = [value]
            elif kind == "skill" and value in SKILLS:
                families = SKILLS[value]
            else:
                out.append(f"unknown feature {feature!r}")
                continue
            rng = _rng(self.seed, ref["instruction"], feature)
            base = len(task.letters) if task else (MIN_LEN + MAX_LEN) // 2
            lengths = range(max(MIN_LEN, base - 2), min(MAX_LEN, base + 2) + 1)
            new = [make_task(rng.choice(families), rng.choice(lengths), rng) for _ in range(n)]
            out.append({"instructions": [t.instruction for t in new]})
        return out

    def refine(
        self, requests: Sequence[tuple[dict, dict, str, str]], attempt: int = 0
    ) -> list[dict | str]:
        """(reference, response feedback, instruction, response) -> the improved response.

        The world knows every answer, so following the feedback ("exactly the
        result, nothing else") means writing the solved answer.
        """
        out: list[dict | str] = []
        for _ref, _feedback, instruction, _response in requests:
            task = parse_instruction(instruction)
            if task is None:
                out.append(NOT_A_TASK.format(instruction=instruction))
            else:
                out.append({"response": solve(task.family, task.letters)})
        return out

    def judge(self, requests: Sequence[tuple[str, str]], attempt: int = 0) -> list[dict | str]:
        """(instruction, response) -> a 0..10 quality score."""
        return [{"score": 10.0 * check(instr, resp)} for instr, resp in requests]
