"""Bradley-Terry reward models on (prompt, chosen, rejected) pairs, trained with TRL.

A scalar head on the last token of any causal LM backbone
(`AutoModelForSequenceClassification`), trained by TRL's `RewardTrainer`:
loss -log sigmoid(r_chosen - r_rejected - margin), with optional reward
centering. The reward mean and std over the training pairs are saved beside
the model so that scores can be normalised after reloading.

Prompts and answers are strings or chat messages (`flywheel.llm.chat`). A pair is
rendered as the model will read it (the tokenizer's chat template under prompt format
`chat`), tokenized here as prompt ids + answer ids + EOS and fitted into `max_length`;
the same rendering is saved with the model and used when scoring.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field

from flywheel.llm.chat import (
    NotAText,
    Prompt,
    PromptFormat,
    _assistant_content,
    as_text_value,
    is_empty,
    is_messages,
    render_conversation,
    resolve_format,
)
from flywheel.llm.tokens import (
    LengthReport,
    OverLength,
    ensure_pad_token,
    fit_to_length,
    position_limit,
)

log = logging.getLogger(__name__)

PAIR_COLUMNS = ("prompt", "chosen", "rejected")
STATS_FILE = "reward_stats.json"


class PreferenceDataError(ValueError):
    """Preference data that cannot be used at all; the message names the column."""


def _normalized(value: Any) -> Any:
    """A text value as `as_text_value` gives it (messages from parquet arrive as numpy
    arrays of dicts), or the value itself when it is not a text."""
    try:
        return as_text_value(value)
    except NotAText:
        return value


def pair_key(row: dict) -> tuple[str, ...]:
    """What makes two rows the same pair: their prompt, chosen and rejected values
    (repr of the normalized value, so that 3 and "3", or None and "None", stay different,
    and messages read from parquet equal the same messages given as a list)."""
    return tuple(repr(_normalized(row.get(c))) for c in PAIR_COLUMNS)


def _answer_text(value: Prompt) -> str:
    """What the assistant says in an answer: the string, or the messages' assistant turns."""
    return value if isinstance(value, str) else _assistant_content(value)


def _problem(row: dict) -> tuple[str, dict[str, Prompt] | str]:
    """("", normalized texts) for a usable row, else (reason, error message)."""
    texts: dict[str, Prompt] = {}
    for c in PAIR_COLUMNS:
        value = row[c]
        if not isinstance(value, str) and not is_messages(value):
            return "non-text value", f"{c}: {type(value).__name__} is neither text nor messages"
        if is_messages(value) and len(value) == 0:
            return "empty text", f"{c}: no messages"
        try:
            texts[c] = as_text_value(value, where=c)
        except NotAText as e:
            return "malformed chat messages", str(e)
    for c in PAIR_COLUMNS:
        if is_empty(texts[c]):
            return "empty text", f"{c} is blank"
    for c in ("chosen", "rejected"):
        if isinstance(texts[c], list) and not any(m["role"] == "assistant" for m in texts[c]):
            return "answer messages without an assistant turn", f"{c} has no assistant message"
    if _answer_text(texts["chosen"]) == _answer_text(texts["rejected"]):
        return "chosen identical to rejected", "the two answers say the same"
    return "", texts


def clean_preferences(rows: Sequence[dict], source: str) -> tuple[list[dict], dict]:
    """Keep the usable pairs; report the others by reason, with a count and an example.

    Each of prompt, chosen and rejected may be a string or chat messages (a list, or a
    numpy array from parquet, of {role, content}); kept rows carry them normalized
    (messages as lists of plain dicts). Missing columns stop everything (nothing could be
    trained); rows with a value that is neither text nor messages, malformed messages,
    empty text, an answer in messages with no assistant turn, or chosen and rejected
    saying the same are kept out of training. Copies of a kept pair (same prompt, chosen
    and rejected) are kept but counted under "duplicates", with the first copy as the
    example.
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

    for i, row in enumerate(rows):
        reason, found = _problem(row)
        if reason:
            entry = dropped.setdefault(
                reason, {"count": 0, "example_row": i, "example": row, "error": found}
            )
            entry["count"] += 1
            continue
        kept.append({**row, **found})
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
            "%s: %d row(s) kept out of training (%s), e.g. row %d: %s",
            source,
            entry["count"],
            reason,
            entry["example_row"],
            entry["error"],
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


class PairTrainingConfig(BaseModel):
    """What every reward model here is trained with: the backbone, the schedule and how
    pairs are read (see `RewardTrainingConfig` and the ensemble's `EnsembleConfig`)."""

    base_model: str = Field(description="folder or hub name of the causal LM backbone")
    epochs: float = Field(1.0, gt=0)
    learning_rate: float = Field(1e-3, gt=0)
    batch_size: int = Field(32, ge=1)
    max_length: int = Field(128, ge=8, description="tokens of prompt + answer + EOS")
    prompt_format: PromptFormat = Field(
        "auto", description="auto: the chat template when the tokenizer has one, else raw"
    )
    over_length: OverLength = Field(
        "truncate", description="pairs longer than max_length: cut to fit, or leave out"
    )
    seed: int = 0


class RewardTrainingConfig(PairTrainingConfig):
    center_rewards_coefficient: float | None = Field(
        0.01, ge=0, description="weight of the mean-zero reward penalty; null: off"
    )


def trl_settings(config: Any, out_dir: str | Path, logging_steps: int) -> dict[str, Any]:
    """The TRL trainer settings shared by our trainers: the schedule of `config` (its
    batch_size, epochs, learning_rate and seed), scratch output under out_dir/_trainer,
    no checkpoints, evaluation or reports (the caller saves what it keeps), no progress
    bars, and the CPU when there is no GPU. max_length is None: pairs reach TRL already
    fitted, and TRL would otherwise cut or silently drop longer ones on its own terms."""
    import torch

    return {
        "output_dir": str(Path(out_dir) / "_trainer"),
        "per_device_train_batch_size": config.batch_size,
        "num_train_epochs": config.epochs,
        "learning_rate": config.learning_rate,
        "seed": config.seed,
        "max_length": None,
        "logging_steps": logging_steps,
        "save_strategy": "no",
        "eval_strategy": "no",
        "report_to": [],
        "disable_tqdm": True,
        "use_cpu": not torch.cuda.is_available(),
    }


def check_max_length(config: Any, max_length: int, base_model: str | Path) -> None:
    limit = position_limit(config)
    if limit is not None and max_length > limit:
        raise ValueError(
            f"max_length: {max_length} is more than the {limit} positions of {base_model}; "
            f"set max_length to {limit} or less"
        )


def pad_with_stand_in(tok: Any, model_config: Any) -> str | None:
    """`ensure_pad_token`, and the model told which id pads (sequence-classification
    heads find the last real token by it). Returns the stand-in's name, or None."""
    stand_in = ensure_pad_token(tok)
    model_config.pad_token_id = tok.pad_token_id
    return stand_in


class PairEncoder:
    """How a reward model reads (prompt, answer): rendered in `prompt_format` with
    `chat.render_conversation`, tokenized as prompt ids + answer ids + EOS (no other
    special tokens: a chat template writes its own), fitted into `max_length`.

    With the pad token standing in for EOS, sequence-classification heads read the last
    token that is not EOS; training, evaluation and scoring all read the same way.
    """

    def __init__(self, tok: Any, prompt_format: Literal["raw", "chat"], max_length: int) -> None:
        self.tok, self.prompt_format, self.max_length = tok, prompt_format, max_length

    def encode(
        self,
        prompts: Sequence[Any],
        answers: Sequence[Any],
        over_length: OverLength = "truncate",
        where: str = "texts",
    ) -> tuple[list[list[int] | None], LengthReport]:
        """Ids of each (prompt, answer), None where `drop` left one out, and the report."""
        if len(prompts) != len(answers):
            raise ValueError(f"{len(prompts)} prompts but {len(answers)} completions")
        report = LengthReport(self.max_length, over_length)
        if not prompts:
            return [], report
        rendered = [
            render_conversation(
                self.tok,
                as_text_value(p, where=f"{where}: prompt {i}"),
                as_text_value(a, where=f"{where}: answer {i}"),
                self.prompt_format,
            )
            for i, (p, a) in enumerate(zip(prompts, answers, strict=True))
        ]
        prompt_ids = self.tok([p for p, _ in rendered], add_special_tokens=False)["input_ids"]
        answer_ids = self.tok([a for _, a in rendered], add_special_tokens=False)["input_ids"]
        eos = [] if self.tok.eos_token_id is None else [self.tok.eos_token_id]
        out: list[list[int] | None] = []
        for p, a in zip(prompt_ids, answer_ids, strict=True):
            fitted = fit_to_length(p, [*a, *eos], report)
            out.append(None if fitted is None else fitted[0])
        return out, report

    def encode_pairs(
        self, rows: Sequence[dict], over_length: OverLength, source: str
    ) -> tuple[list[tuple[int, list[int], list[int]]], dict]:
        """(row index, chosen ids, rejected ids) of each pair within `max_length`, and the
        length figures: the LengthReport over both answers, plus `pairs` (kept) and
        `pairs_dropped` (a pair goes when either of its texts does)."""
        prompts = [r["prompt"] for r in rows]
        chosen, report = self.encode(prompts, [r["chosen"] for r in rows], over_length, source)
        rejected, other = self.encode(prompts, [r["rejected"] for r in rows], over_length, source)
        pairs = [
            (i, c, r)
            for i, (c, r) in enumerate(zip(chosen, rejected, strict=True))
            if c is not None and r is not None
        ]
        length = {
            **report.merge(other).as_dict(),
            "pairs": len(pairs),
            "pairs_dropped": len(rows) - len(pairs),
        }
        if length["pairs_dropped"]:
            log.warning(
                "%s: %d of %d pair(s) left out, longer than max_length %d (over_length=drop)",
                source,
                length["pairs_dropped"],
                len(rows),
                self.max_length,
            )
        if not pairs:
            raise PreferenceDataError(
                f"{source}: all {len(rows)} pair(s) are longer than max_length "
                f"{self.max_length} tokens (the longest has {length['longest']}) and "
                "over_length is 'drop'; raise max_length or set over_length='truncate'"
            )
        return pairs, length

    def batch(self, seqs: Sequence[Sequence[int]], device: Any) -> dict:
        """Right-padded input_ids and attention_mask: reward heads read the last real token."""
        import torch

        width = max(len(s) for s in seqs)
        pad = self.tok.pad_token_id
        ids = torch.tensor([[*s, *[pad] * (width - len(s))] for s in seqs], device=device)
        mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs], device=device)
        return {"input_ids": ids, "attention_mask": mask}


def pairwise_accuracy_of(chosen: Sequence[float], rejected: Sequence[float]) -> float:
    """Share of pairs, over all pairs, whose rewards order them right: r_chosen > r_rejected
    counts 1, a tie counts 0.5 (the model cannot tell the two apart: a coin flip), and
    r_chosen < r_rejected counts 0."""
    if not chosen:
        raise ValueError("pairwise accuracy of no pairs")
    wins = sum(
        1.0 if c > r else 0.5 if c == r else 0.0 for c, r in zip(chosen, rejected, strict=True)
    )
    return wins / len(chosen)


def _rewards(
    model, encoder: PairEncoder, seqs: Sequence[list[int]], batch_size: int = 64
) -> list[float]:
    import torch

    out: list[float] = []
    with torch.no_grad():
        for start in range(0, len(seqs), batch_size):
            batch = encoder.batch(seqs[start : start + batch_size], model.device)
            out += model(**batch).logits[:, 0].float().tolist()
    return out


def train_reward_model(
    train_rows: Sequence[dict],
    eval_rows: Sequence[dict],
    config: RewardTrainingConfig,
    out_dir: str | Path,
) -> dict:
    """Train with TRL's RewardTrainer; save model, tokenizer and reward stats to out_dir.

    Rows may carry a `margin` (the preference strength), which the loss uses. Pairs are
    tokenized here and handed to TRL as ids (TRL then tokenizes and filters nothing):
    `trained_pairs` is what TRL trained on, and `length` says per split how many texts
    were cut or left out for `max_length`. `eval_pairwise_accuracy` is over all eval pairs
    (see `pairwise_accuracy_of`). Returns those, the cleaning reports and training figures.
    """
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from trl import RewardConfig, RewardTrainer

    train, train_report = clean_preferences(train_rows, "train pairs")
    evaluation, eval_report = clean_preferences(eval_rows, "eval pairs")
    tok = AutoTokenizer.from_pretrained(config.base_model)
    model = AutoModelForSequenceClassification.from_pretrained(config.base_model, num_labels=1)
    stand_in = pad_with_stand_in(tok, model.config)
    check_max_length(model.config, config.max_length, config.base_model)
    encoder = PairEncoder(tok, resolve_format(config.prompt_format, tok), config.max_length)
    train_pairs, train_length = encoder.encode_pairs(train, config.over_length, "train pairs")
    eval_pairs, eval_length = encoder.encode_pairs(evaluation, config.over_length, "eval pairs")
    margin = "margin" in train[0]
    dataset = Dataset.from_list(
        [
            {
                "chosen_ids": c,
                "rejected_ids": r,
                **({"margin": train[i]["margin"]} if margin else {}),
            }
            for i, c, r in train_pairs
        ]
    )
    args = RewardConfig(
        **trl_settings(config, out_dir, logging_steps=20),
        center_rewards_coefficient=config.center_rewards_coefficient,
    )
    trainer = RewardTrainer(model=model, args=args, train_dataset=dataset, processing_class=tok)
    trained_pairs = len(trainer.train_dataset)
    if trained_pairs != len(train_pairs):  # a TRL that filters or re-tokenizes after all
        raise RuntimeError(
            f"TRL kept {trained_pairs} of the {len(train_pairs)} tokenized training pairs"
        )
    result = trainer.train()
    model.eval()
    chosen = _rewards(model, encoder, [c for _, c, _ in train_pairs])
    rejected = _rewards(model, encoder, [r for _, _, r in train_pairs])
    eval_chosen = _rewards(model, encoder, [c for _, c, _ in eval_pairs])
    eval_rejected = _rewards(model, encoder, [r for _, _, r in eval_pairs])
    every = chosen + rejected
    mean = sum(every) / len(every)
    std = (sum((r - mean) ** 2 for r in every) / len(every)) ** 0.5 or 1.0
    stats = {
        "reward_mean": mean,
        "reward_std": std,
        "eval_pairwise_accuracy": pairwise_accuracy_of(eval_chosen, eval_rejected),
        "eval_pairs": len(eval_pairs),
        "train_pairwise_accuracy": pairwise_accuracy_of(chosen, rejected),
        "trained_pairs": trained_pairs,
        "prompt_format": encoder.prompt_format,
        "max_length": config.max_length,
        "pad_token_stand_in": stand_in,
        "length": {"train": train_length, "eval": eval_length},
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
    """A saved reward model; `score` gives rewards normalised by the training stats.

    Texts are rendered and cut to `max_length` as in training (prompt format and
    max_length are saved with the model); `length` counts what scoring has cut so far.
    """

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
        pad_with_stand_in(self.tok, self.model.config)
        # models saved before prompt formats read prompt + answer as raw text
        max_length = self.stats.get("max_length", self.stats["config"]["max_length"])
        self.encoder = PairEncoder(self.tok, self.stats.get("prompt_format", "raw"), max_length)
        self.length = LengthReport(max_length)

    def score(self, prompts: Sequence[Prompt], completions: Sequence[Prompt]) -> list[float]:
        seqs, report = self.encoder.encode(prompts, completions, "truncate", "score")
        self.length = self.length.merge(report)
        raw = _rewards(self.model, self.encoder, seqs)
        return [(r - self.stats["reward_mean"]) / self.stats["reward_std"] for r in raw]
