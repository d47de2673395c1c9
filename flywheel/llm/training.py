"""Supervised fine-tuning of a causal LM on (prompt, answer) pairs, for any model.

A plain torch loop: the models trained here are small, so the loop is bound by Python
overhead and a Trainer would add only start-up time. Loss is on the answer tokens and
the EOS only.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Sequence

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase


def _encode(tok: PreTrainedTokenizerBase, prompt: str, answer: str) -> tuple[list[int], list[int]]:
    p = tok(prompt, add_special_tokens=False)["input_ids"]
    a = tok(answer, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    return p + a, [-100] * len(p) + a


def train_causal_lm(
    model: PreTrainedModel,
    tok: PreTrainedTokenizerBase,
    examples: Sequence[tuple[str, str]] | Callable[[random.Random], tuple[str, str]],
    *,
    steps: int,
    batch_size: int = 64,
    lr: float = 3e-3,
    seed: int = 0,
    progress: Callable[[int, float], None] | None = None,
) -> dict:
    """Train on a fixed list of (prompt, answer) pairs, or on a sampler of fresh ones.

    Exactly `steps` steps with a cosine schedule and warm-up, so a seed gives the same
    model on a fast or a busy machine. Returns {"steps", "loss", "seconds"}.
    """
    if not callable(examples) and not examples:
        raise ValueError("examples is empty: nothing to train on")
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    rng = random.Random(seed)
    torch.manual_seed(seed)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    total = steps
    warmup = max(1, steps // 20)

    def lr_at(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    start = time.monotonic()
    loss_value = float("nan")
    for step in range(total):
        if callable(examples):
            batch = [examples(rng) for _ in range(batch_size)]
        else:
            batch = [examples[rng.randrange(len(examples))] for _ in range(batch_size)]
        encoded = [_encode(tok, p, a) for p, a in batch]
        width = max(len(ids) for ids, _ in encoded)
        # right padding for training: positions then match an unpadded prompt
        input_ids = torch.full((len(encoded), width), tok.pad_token_id)
        labels = torch.full((len(encoded), width), -100)
        mask = torch.zeros((len(encoded), width), dtype=torch.long)
        for i, (ids, lab) in enumerate(encoded):
            input_ids[i, : len(ids)] = torch.tensor(ids)
            labels[i, : len(lab)] = torch.tensor(lab)
            mask[i, : len(ids)] = 1
        device = model.device
        loss = model(
            input_ids=input_ids.to(device), attention_mask=mask.to(device), labels=labels.to(device)
        ).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        loss_value = loss.item()
        if progress and (step % 100 == 0 or step == total - 1):
            progress(step, loss_value)
    model.eval()
    return {"steps": total, "loss": loss_value, "seconds": time.monotonic() - start}
