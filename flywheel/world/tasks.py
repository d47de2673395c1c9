"""Task families of the embedded world: short string tasks with checkable answers.

An instruction reads `"<family> <letters>"`; the model sees `"<instruction>="` and
answers with the result. Difficulty is the length of the letter string.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import asdict, dataclass, field

LETTERS = "abcdefghijklmnopqrstuvwxyz"
SEP = "="  # between instruction and answer
MIN_LEN, MAX_LEN = 3, 8


def _dedup(s: str) -> str:
    return "".join(dict.fromkeys(s))


def _shift(s: str) -> str:
    return "".join(LETTERS[(LETTERS.index(c) + 1) % 26] for c in s)


# family -> (solver, skill tags). Families share skills so that REFED's skill
# features reach across families.
FAMILIES: dict[str, tuple] = {
    "copy": (lambda s: s, ["transcription"]),
    "reverse": (lambda s: s[::-1], ["ordering", "transcription"]),
    "sort": (lambda s: "".join(sorted(s)), ["ordering", "comparison"]),
    "count": (lambda s: str(len(s)), ["counting"]),
    "shift": (_shift, ["alphabet_arithmetic", "transcription"]),
    "dedup": (_dedup, ["comparison", "transcription"]),
}
SKILLS: dict[str, list[str]] = {}
for _family, (_, _skills) in FAMILIES.items():
    for _skill in _skills:
        SKILLS.setdefault(_skill, []).append(_family)


@dataclass(frozen=True)
class Task:
    family: str
    letters: str
    skills: list[str] = field(default_factory=list)

    @property
    def instruction(self) -> str:
        return f"{self.family} {self.letters}"

    @property
    def prompt(self) -> str:
        return self.instruction + SEP

    @property
    def answer(self) -> str:
        return solve(self.family, self.letters)

    @property
    def difficulty(self) -> int:
        return len(self.letters)

    @property
    def id(self) -> str:
        return hashlib.sha1(self.instruction.encode()).hexdigest()[:12]

    def as_row(self) -> dict:
        row = asdict(self)
        row.update(
            id=self.id,
            instruction=self.instruction,
            response=self.answer,
            difficulty=self.difficulty,
        )
        return row


def solve(family: str, letters: str) -> str:
    if family not in FAMILIES:
        raise ValueError(f"unknown task family {family!r}; known: {sorted(FAMILIES)}")
    return FAMILIES[family][0](letters)


def make_task(family: str, length: int, rng: random.Random) -> Task:
    """A task of `family` over `length` random letters (dedup gets repeats on purpose)."""
    if family == "dedup":
        pool = rng.sample(LETTERS, max(2, length // 2 + 1))
        letters = "".join(rng.choice(pool) for _ in range(length))
    else:
        letters = "".join(rng.choice(LETTERS) for _ in range(length))
    return Task(family, letters, list(FAMILIES[family][1]))


def parse_instruction(instruction: str) -> Task | None:
    """The task an instruction states, or None when it is not a well-formed world task."""
    parts = instruction.strip().split(" ")
    if len(parts) != 2 or parts[0] not in FAMILIES:
        return None
    family, letters = parts
    if not letters or any(c not in LETTERS for c in letters):
        return None
    return Task(family, letters, list(FAMILIES[family][1]))


def check(task: Task | str, answer: str) -> float:
    """1.0 when `answer` is the task's correct answer, else 0.0. Accepts an instruction string."""
    if isinstance(task, str):
        parsed = parse_instruction(task)
        if parsed is None:
            return 0.0
        task = parsed
    return 1.0 if answer.strip() == task.answer else 0.0


def sample_tasks(
    n: int,
    rng: random.Random,
    families: list[str] | None = None,
    min_len: int = MIN_LEN,
    max_len: int = MAX_LEN,
) -> list[Task]:
    families = families or list(FAMILIES)
    return [make_task(rng.choice(families), rng.randint(min_len, max_len), rng) for _ in range(n)]


# The world's one-shot format: a solved example line, then the new instruction.
ONE_SHOT_TEMPLATE = "{example_instruction}" + SEP + "{example_response}\n{instruction}" + SEP


def one_shot_prompt(example_instruction: str, example_response: str, instruction: str) -> str:
    return ONE_SHOT_TEMPLATE.format(
        example_instruction=example_instruction,
        example_response=example_response,
        instruction=instruction,
    )


def answer_preference_pairs(n: int, rng: random.Random) -> list[dict]:
    """(prompt, chosen, rejected): the correct answer over a plausible wrong one (the answer
    reversed, or padded when reversing changes nothing), for reward models."""
    rows = []
    for task in sample_tasks(n, rng):
        wrong = task.answer[::-1] if task.answer[::-1] != task.answer else task.answer + "a"
        rows.append({"prompt": task.prompt, "chosen": task.answer, "rejected": wrong})
    return rows


# --- group preferences that disagree (for group robust preference optimisation) ---

# Two groups want the same answer in different styles; sizes are unequal on purpose.
GROUP_STYLES = {
    "plain": lambda answer: answer,
    "spaced": lambda answer: " ".join(answer),
}
GROUP_SHARES = {"plain": 0.8, "spaced": 0.2}


def group_preference_pairs(n: int, rng: random.Random) -> list[dict]:
    """(group, prompt, chosen, rejected) rows: each group prefers its own style."""
    groups, weights = zip(*GROUP_SHARES.items(), strict=True)
    rows: list[dict] = []
    # count answers are one digit: both styles would be the same string
    families = [f for f in FAMILIES if f != "count"]
    while len(rows) < n:
        task = sample_tasks(1, rng, families, min_len=3, max_len=6)[0]
        if len(task.answer) < 2:  # e.g. dedup of "aaa": the styles would not differ
            continue
        group = rng.choices(groups, weights)[0]
        other = next(g for g in groups if g != group)
        rows.append(
            dict(
                group=group,
                family=task.family,
                prompt=f"[{group}] {task.prompt}",
                chosen=GROUP_STYLES[group](task.answer),
                rejected=GROUP_STYLES[other](task.answer),
            )
        )
    return rows
