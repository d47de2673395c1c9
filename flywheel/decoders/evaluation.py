"""The decoders' outputs measured: exact match against reference answers, the share of
tokens a writer wrote, each model or agent alone on the same prompts, and Co-LLM's eta
sweep as a table."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from flywheel.decoders.collab import RewardFn
from flywheel.decoders.stepping import CausalLM, chunks, decode_text, greedy_decode
from flywheel.llm.base import Backend, call_each
from flywheel.llm.chat import Prompt

log = logging.getLogger(__name__)


def correct(answer: str | None, completion: str | None) -> bool | None:
    """Exact match, surrounding whitespace aside; None without an answer or a completion."""
    if answer is None or completion is None:
        return None
    return completion.strip() == answer.strip()


def accuracy(answers: Sequence[str | None], completions: Sequence[str | None]) -> float | None:
    """The share of completions that match their answer (a missing completion is wrong),
    or None when any answer is missing."""
    if any(a is None for a in answers):
        return None
    right = [correct(a, c) is True for a, c in zip(answers, completions, strict=True)]
    return sum(right) / len(right)


def share(writers: Sequence[Sequence[str]], writer: str) -> float:
    """The fraction of all written tokens (one writer name per token) that `writer` wrote."""
    total = sum(len(w) for w in writers)
    return sum(list(w).count(writer) for w in writers) / total if total else 0.0


def greedy_texts(
    lm: CausalLM, prompts: Sequence[str], max_new_tokens: int, batch_size: int
) -> list[str]:
    """`lm` alone, greedy, `batch_size` prompts at a time."""
    texts: list[str] = []
    for batch in chunks(len(prompts), batch_size):
        ids = greedy_decode(lm, [prompts[i] for i in batch], max_new_tokens)
        texts += [decode_text(lm, row) for row in ids]
    return texts


@dataclass(frozen=True)
class AloneScore:
    """One agent alone on the prompts."""

    mean_reward: float | None  # over the answered prompts; None when every call failed
    accuracy: float | None  # None when the prompts carry no answers
    failed_calls: int


def agent_alone(
    agent: Backend,
    name: str,
    prompts: Sequence[str],
    given: Sequence[Prompt],
    answers: Sequence[str | None],
    reward: RewardFn,
    *,
    max_new_tokens: int,
    stop: Sequence[str] | None,
) -> AloneScore:
    """`agent`'s greedy completion of each prompt as `given` (it renders them in its own
    prompt format), scored by `reward` against the rendered `prompts`. A malformed answer
    counts as wrong, is left out of the mean reward, and is logged with its raw text."""
    results = call_each(
        lambda batch: agent.generate(
            batch, max_new_tokens=max_new_tokens, temperature=0.0, stop=stop
        ),
        given,
    )
    texts = [r if isinstance(r, str) else None for r in results]
    answered = [i for i, t in enumerate(texts) if t is not None]
    for i, result in enumerate(results):
        if texts[i] is None:
            log.warning("%s alone, prompt %d: %s; raw: %.500r", name, i, result, result.raw)
    scores = list(reward([prompts[i] for i in answered], [texts[i] for i in answered]))
    return AloneScore(
        mean_reward=sum(scores) / len(scores) if scores else None,
        accuracy=accuracy(answers, texts),
        failed_calls=len(prompts) - len(answered),
    )


def sweep_table(results: Sequence[Mapping], chosen_eta: float, scorer: str) -> str:
    """`sweep_eta`'s results as a markdown table, the chosen eta marked."""
    lines = [f"| eta | {scorer} | share deferred |", "|---|---|---|"]
    for r in results:
        mark = " (chosen)" if r["eta"] == chosen_eta else ""
        lines.append(f"| {r['eta']:g}{mark} | {r['score']:.3f} | {r['deferral_share']:.3f} |")
    return "\n".join(lines)
