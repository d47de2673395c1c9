"""A policy backend that answers from a script, for planner and proposer mechanics."""

from __future__ import annotations

from collections.abc import Sequence

from flywheel.llm import Backend, TokenLogprob


class ScriptedBackend(Backend):
    """Answers cycle through `answers`, in order; records the prompts it was sent."""

    model = "scripted"

    def __init__(self, answers: Sequence[str]) -> None:
        self.answers = list(answers)
        self.prompts: list[str] = []

    def generate(self, prompts, *, max_new_tokens=64, temperature=0.0, stop=None, seed=None):
        start = len(self.prompts)
        self.prompts += prompts
        return [self.answers[(start + i) % len(self.answers)] for i in range(len(prompts))]

    def score(self, prompts, completions) -> list[list[float]]:
        raise NotImplementedError

    def next_token_topk(self, prefixes, k=5) -> list[list[TokenLogprob]]:
        raise NotImplementedError
