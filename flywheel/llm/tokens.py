"""Tokenizer details every model-handling method needs, written once."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal


def ensure_pad_token(tokenizer: Any) -> str | None:
    """Give a tokenizer without a pad token one, in place, and say which stood in.

    Padding positions are masked out everywhere Flywheel pads, so any existing token can
    pad; EOS is the usual choice (GPT-2 and Llama ship without a pad token). Returns the
    stand-in's name, or None when the tokenizer already had a pad token.
    """
    if tokenizer.pad_token_id is not None:
        return None
    for name in ("eos_token", "unk_token", "bos_token"):
        token = getattr(tokenizer, name, None)
        if token is not None:
            tokenizer.pad_token = token
            return name
    raise ValueError(
        f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no pad, eos, unk or bos "
        "token to pad with: set `pad_token` in its tokenizer_config.json"
    )


def position_limit(config: Any) -> int | None:
    """Positions a model has learned embeddings for (GPT-2's `n_positions`): longer inputs
    fail with an index error. Rotary models (Llama, Qwen2) have no hard limit: None."""
    if getattr(config, "n_positions", None):
        return config.n_positions
    if getattr(config, "rope_parameters", None) or getattr(config, "rope_theta", None):
        return None
    return getattr(config, "max_position_embeddings", None)


OverLength = Literal["truncate", "drop"]


@dataclass
class LengthReport:
    """How many texts a method tokenized, and how many it cut or left out for length:
    reported in the run's summary, never silent."""

    max_length: int
    over_length: OverLength = "truncate"
    texts: int = 0
    truncated: int = 0
    dropped: int = 0
    longest: int = 0  # tokens of the longest text before any cut

    def as_dict(self) -> dict[str, int | str]:
        return asdict(self)

    def merge(self, other: LengthReport) -> LengthReport:
        return LengthReport(
            self.max_length,
            self.over_length,
            self.texts + other.texts,
            self.truncated + other.truncated,
            self.dropped + other.dropped,
            max(self.longest, other.longest),
        )


def fit_to_length(
    prompt_ids: Sequence[int], answer_ids: Sequence[int], report: LengthReport
) -> tuple[list[int], int] | None:
    """Prompt + answer ids within `report.max_length`, and where the answer starts.

    Too long: with `truncate` the prompt loses tokens from its start first (its end, next
    to the answer, matters most), then the answer from its end; with `drop`, None. Either
    way the report counts it.
    """
    report.texts += 1
    total = len(prompt_ids) + len(answer_ids)
    report.longest = max(report.longest, total)
    limit = report.max_length
    if total <= limit:
        return [*prompt_ids, *answer_ids], len(prompt_ids)
    if report.over_length == "drop":
        report.dropped += 1
        return None
    report.truncated += 1
    answer = list(answer_ids[:limit])
    keep = limit - len(answer)
    prompt = list(prompt_ids[len(prompt_ids) - keep :]) if keep > 0 else []
    return [*prompt, *answer], len(prompt)
