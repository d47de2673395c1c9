"""transformers' own greedy decoding, the reference the decoders are checked against."""

from __future__ import annotations

import torch

from flywheel.decoders.stepping import CausalLM


def hf_greedy(lm: CausalLM, prompts: list[str], max_new_tokens: int) -> list[list[int]]:
    """transformers' own greedy generate on a left-padded batch, cut after the first EOS."""
    lm.tokenizer.padding_side = "left"
    enc = lm.tokenizer(prompts, padding=True, return_tensors="pt")
    with torch.no_grad():
        out = lm.model.generate(
            **enc,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=lm.tokenizer.pad_token_id,
        )
    rows = out[:, enc["input_ids"].shape[1] :].tolist()
    eos = lm.eos_ids
    return [row[: next((j + 1 for j, t in enumerate(row) if t in eos), len(row))] for row in rows]
