"""Token-level hybrid decoding: a small model writes, a large one takes its uncertain tokens.

"Hybrid SLM and LLM for Edge-Cloud Collaborative Inference" (2024). At every
step the small model's next-token distribution is measured; when it is too
uncertain the large model writes that token instead. Both models keep KV caches
fed every chosen token, so neither re-reads the prefix; the large model's cache
catches up lazily, in one forward over the tokens it missed, only on steps where
some row sends it a token (`CausalStepper`). The share of tokens sent to the
large model is the cost to report against quality.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from flywheel.decoders.stepping import (
    CausalLM,
    CausalStepper,
    Decoded,
    check_prompts,
    check_same_vocab,
    chunks,
    decode_text,
    drive,
    prompt_ids,
)

SMALL, LARGE = "small", "large"
Measure = Literal["entropy", "max_prob"]
MEASURES = ("entropy", "max_prob")


def check_threshold(measure: str, threshold: float) -> None:
    """Raise ValueError for an unknown measure or a threshold outside its range."""
    if measure not in MEASURES:
        raise ValueError(
            f"measure must be one of {list(MEASURES)} (field: measure), got {measure!r}"
        )
    number = isinstance(threshold, int | float) and not isinstance(threshold, bool)
    if measure == "entropy" and not (number and 0 <= threshold < math.inf):
        raise ValueError(
            f"threshold must be a finite number >= 0 for measure 'entropy' (field: threshold), "
            f"got {threshold!r}: a token goes to the large model when the small model's "
            "entropy in nats is above it"
        )
    if measure == "max_prob" and not (number and 0 <= threshold <= 1):
        raise ValueError(
            f"threshold must be in [0, 1] for measure 'max_prob' (field: threshold), got "
            f"{threshold!r}: a token goes to the large model when the small model's top "
            "probability is below it"
        )


def uncertain(logits: torch.Tensor, measure: Measure, threshold: float) -> torch.Tensor:
    """Per row, whether the next-token distribution crosses the threshold (float64, so a
    confident model's top probability does not round to exactly 1)."""
    logp = torch.log_softmax(logits.double(), dim=-1)
    if measure == "entropy":
        entropy = -(logp.exp() * logp).nan_to_num().sum(-1)
        return entropy > threshold
    return logp.max(-1).values.exp() < threshold


class HybridConfig(BaseModel):
    """The gate: which uncertainty measure, and the threshold past which the small model's
    token goes to the large model instead."""

    model_config = ConfigDict(extra="forbid")

    measure: Measure = "entropy"
    threshold: float = Field(
        0.5,
        ge=0,
        description="entropy: send when above it (nats); max_prob: send when the top "
        "probability is below it (0..1)",
    )

    @model_validator(mode="after")
    def _check(self) -> HybridConfig:
        check_threshold(self.measure, self.threshold)
        return self


@torch.inference_mode()
def hybrid_decode(
    small: CausalLM,
    large: CausalLM,
    prompts: Sequence[str],
    *,
    threshold: float,
    measure: Measure = "entropy",
    max_new_tokens: int = 16,
    batch_size: int = 64,
) -> Decoded:
    """Greedy hybrid decoding. With measure "entropy" a token goes to the large model
    when the small model's entropy (nats) > threshold; with "max_prob" when its top
    probability < threshold. `writers` holds "small"/"large" per token and
    `share("large")` is the fraction sent to the large model."""
    check_threshold(measure, threshold)
    check_prompts(prompts)
    check_same_vocab(small.tokenizer, large.tokenizer, small.name, large.name)
    ids: list[list[int]] = []
    writers: list[list[int]] = []
    for idx in chunks(len(prompts), batch_size):
        encoded = [prompt_ids(small.tokenizer, prompts[i]) for i in idx]
        lead = CausalStepper(small, encoded)
        helper = CausalStepper(large, encoded)

        def choose(
            _: list[list[int]], lead: CausalStepper = lead, helper: CausalStepper = helper
        ) -> tuple[torch.Tensor, torch.Tensor]:
            send = uncertain(lead.logits, measure, threshold) & ~lead.finished
            chosen = lead.logits.argmax(-1)
            if bool(send.any()):  # else the large model's stepper is not read and does not run
                chosen = torch.where(send, helper.logits.argmax(-1), chosen)
            return chosen, send.long()

        batch_ids, batch_writers = drive([lead, helper], choose, max_new_tokens)
        ids += batch_ids
        writers += batch_writers
    names = (SMALL, LARGE)
    return Decoded(
        texts=[decode_text(small, row) for row in ids],
        token_ids=ids,
        writers=[[names[w] for w in row] for row in writers],
    )
