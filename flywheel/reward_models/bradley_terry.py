"""Bradley-Terry reward models on (prompt, chosen, rejected) pairs, trained with TRL.

A scalar head on the last token of any causal LM backbone
(`AutoModelForSequenceClassification`), trained by TRL's `RewardTrainer`:
loss -log sigmoid(r_chosen - r_rejected - margin), with optional reward
centering. The reward mean and std over the training pairs are saved beside
the model so that scores can be normalised after reloading.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

from pydantic import BaseModel, Field

log = logging.getLogger(__name__)

PAIR_COLUMNS = ("prompt", "chosen", "rejected")
STATS_FILE = "reward_stats.json"


class PreferenceDataError(ValueError):
    """Preference data that cannot be used at all; the message names the column."""


def pair_key(row: dict) -> tuple[str, ...]:
    """What makes two rows the same pair: their prompt, chosen and rejected values
    (repr, so that 3 and "3", or None and "None", stay different)."""
    return tuple(repr(row.get(c)) for c in PAIR_COLUMNS)


def clean_preferences(rows: Sequence[dict], source: str) -> tuple[list[dict], dict]:
    """Keep the usable pairs; report the others by reason, with a count and an example.

    Missing columns stop everything (nothing could be trained); rows with empty
    text or identical chosen and rejected answers are kept out of training. Copies of
    a kept pair (same prompt, chosen and rejected) are kept but counted under
    "duplicates", with the first copy as the example.
    """
    if not rows:
        raise PreferenceDataError(f"{source}: no preference rows")
    missing = [c for c in PAIR_COLUMNS if c not in rows[0]]
    if missing:
        raise PreferenceDataError(
            f"{source}: column(s) {missing} missing (columns present: {sorted(rows[0])}); "
            "preference data needs text columns 'prompt', 'chosen' and 'rejected'"
        )
    kept: list[dict] = []
    dropped: dict[str, dict] = {}
    copies: dict[tuple, int] = {}  # kept rows per pair
    duplicates: dict = {}

    def drop(reason: str, i: int, row: dict) -> None:
        entry = dropped.setdefault(reason, {"count": 0, "example_row": i, "example": row})
        entry["count"] += 1

    for i, row in enumerate(rows):
        texts = [row[c] for c in PAIR_COLUMNS]
        if not all(isinstance(t, str) for t in texts):
            drop("non-text value", i, row)
        elif not all(t.strip() for t in texts):
            drop("empty text", i, row)
        elif row["chosen"] == row["rejected"]:
            drop("chosen identical to rejected", i, row)
        else:
            kept.append(row)
            key = pair_key(row)
            copies[key] = copies.get(key, 0) + 1
            if copies[key] == 2 and "example_row" not in duplicates:
                duplicates.update(example_row=i, example=row)
    duplicates["count"] = sum(n - 1 for n in copies.values())
    duplicates["pairs"] = sum(n > 1 for n in copies.values())
    report = {
        "rows": len(rows),
        "kept": len(kept),
        "distinct": len(copies),
        "dropped": dropped,
        "duplicates": duplicates,
    }
    for reason, entry in dropped.items():
        log.warning(
            "%s: %d row(s) kept out of training (%s), e.g. row %d",
            source,
            entry["count"],
            reason,
            entry["example_row"],
        )
    if duplicates["count"]:
        log.warning(
            "%s: %d row(s) are copies of an earlier pair (same prompt, chosen and rejected; "
            "%d pair(s) have copies), e.g. row %d",
            source,
            duplicates["count"],
            duplicates["pairs"],
            duplicates["example_row"],
        )
    if not kept:
        raise PreferenceDataError(f"{source}: no usable pairs left: {report}")
    return kept, report


class RewardTrainingConfig(BaseModel):
    base_model: str = Field(description="folder or hub name of the causal LM backbone")
    epochs: float = Field(1.0, gt=0)
    learning_rate: float = Field(1e-3, gt=0)
    batch_size: int = Field(32, ge=1)
    max_length: int = Field(128, ge=8)
    center_rewards_coefficient: float | None = Field(
        0.01, ge=0, description="weight of the mean-zero reward penalty; null: off"
    )
    seed: int = 0


def encode_texts(tok, texts: Sequence[str], device) -> dict:
    """Right-padded ids of each text + EOS: reward heads read the last real token."""
    tok.padding_side = "right"
    batch = tok(
        [t + tok.eos_token for t in texts],
        return_tensors="pt",
        padding=True,
        add_special_tokens=False,
    )
    return {k: v.to(device) for k, v in batch.items()}


def _rewards(model, tok, texts: list[str], batch_size: int = 64) -> list[float]:
    import torch

    out: list[float] = []
    with torch.no_grad():
        for start in range(0, len(texts), batch_size):
            batch = encode_texts(tok, texts[start : start + batch_size], model.device)
            out += model(**batch).logits[:, 0].float().tolist()
    return out


def train_reward_model(
    train_rows: Sequence[dict],
    eval_rows: Sequence[dict],
    config: RewardTrainingConfig,
    out_dir: str | Path,
) -> dict:
    """Train with TRL's RewardTrainer; save model, tokenizer and reward stats to out_dir.

    Rows may carry a `margin` (the preference strength), which the loss uses.
    Returns the cleaning reports, training figures and held-out pairwise accuracy.
    """
    import torch
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from trl import RewardConfig, RewardTrainer

    train, train_report = clean_preferences(train_rows, "train pairs")
    evaluation, eval_report = clean_preferences(eval_rows, "eval pairs")
    columns = [*PAIR_COLUMNS, *(["margin"] if "margin" in train[0] else [])]
    tok = AutoTokenizer.from_pretrained(config.base_model)
    model = AutoModelForSequenceClassification.from_pretrained(config.base_model, num_labels=1)
    model.config.pad_token_id = tok.pad_token_id
    args = RewardConfig(
        output_dir=str(Path(out_dir) / "_trainer"),
        per_device_train_batch_size=config.batch_size,
        num_train_epochs=config.epochs,
        learning_rate=config.learning_rate,
        max_length=config.max_length,
        center_rewards_coefficient=config.center_rewards_coefficient,
        seed=config.seed,
        logging_steps=20,
        save_strategy="no",
        eval_strategy="no",
        report_to=[],
        disable_tqdm=True,
        use_cpu=not torch.cuda.is_available(),
    )
    trainer = RewardTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list([{c: r[c] for c in columns} for r in train]),
        eval_dataset=Dataset.from_list([{c: r[c] for c in PAIR_COLUMNS} for r in evaluation]),
        processing_class=tok,
    )
    result = trainer.train()
    metrics = trainer.evaluate()
    model.eval()
    chosen = _rewards(model, tok, [r["prompt"] + r["chosen"] for r in train])
    rejected = _rewards(model, tok, [r["prompt"] + r["rejected"] for r in train])
    every = chosen + rejected
    mean = sum(every) / len(every)
    std = (sum((r - mean) ** 2 for r in every) / len(every)) ** 0.5 or 1.0
    stats = {
        "reward_mean": mean,
        "reward_std": std,
        "eval_pairwise_accuracy": metrics["eval_accuracy"],
        "train_pairwise_accuracy": sum(c > r for c, r in zip(chosen, rejected, strict=True))
        / len(chosen),
        "train_seconds": result.metrics["train_runtime"],
        "train_samples_per_second": result.metrics["train_samples_per_second"],
        "config": config.model_dump(),
    }
    out = Path(out_dir)
    trainer.save_model(str(out))
    tok.save_pretrained(out)
    (out / STATS_FILE).write_text(json.dumps(stats, indent=2))
    return {**stats, "train_rows": train_report, "eval_rows": eval_report}


class RewardModel:
    """A saved reward model; `score` gives rewards normalised by the training stats."""

    def __init__(self, path: str | Path) -> None:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        path = Path(path)
        if not (path / STATS_FILE).exists():
            raise FileNotFoundError(
                f"{path} is not a Flywheel reward model ({STATS_FILE} missing); "
                "train one with train_reward_model"
            )
        self.stats = json.loads((path / STATS_FILE).read_text())
        self.tok = AutoTokenizer.from_pretrained(path)
        self.model = AutoModelForSequenceClassification.from_pretrained(path).eval()

    def score(self, prompts: Sequence[str], completions: Sequence[str]) -> list[float]:
        if len(prompts) != len(completions):
            raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
        texts = [p + c for p, c in zip(prompts, completions, strict=True)]
        raw = _rewards(self.model, self.tok, texts)
        return [(r - self.stats["reward_mean"]) / self.stats["reward_std"] for r in raw]
