"""Group robust preference optimisation (GR-DPO / GR-IPO) on TRL's `DPOTrainer`.

"Group Robust Preference Optimization in Reward-free RLHF" (Ramesh et al., 2024):
preference pairs come from groups that want different things, in unequal numbers.
Plain DPO minimises the mean loss, so the majority wins. GR-DPO instead minimises
the worst group's loss through a min-max game:

1. the DPO (or IPO) loss of every pair, averaged per group in the batch;
2. group weights q updated by exponentiated gradient, q_g <- q_g exp(eta_q l_g),
   then normalised; only groups present in the batch move (an absent group's loss
   is unknown, so its weight keeps its value);
3. the policy step on sum_g q_g l_g over the groups present (weights renormalised
   over them, so a batch that misses a group still takes a full step).

Two options of the paper: a size-adjusted group loss l_g + C / sqrt(n_g) in the
weight update (small groups get more weight, as their loss is noisier), and the
average/worst trade-off `chi`: loss = (1 - chi) * mean pair loss + chi * robust loss.

TRL does the rest: the reference model (a copy, or the base under a disabled LoRA
adapter), batching, optimisation and logging. `compute_loss` is replaced, to keep
per-pair losses that TRL averages away. Pairs reach TRL already tokenized (prompts and
answers as strings or chat messages, rendered per `prompt_format`) and fitted to
`max_length`, so what is cut or dropped is counted per group (see `encode_pairs`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

from pydantic import BaseModel, Field
from trl import DPOConfig, DPOTrainer
from trl.trainer.dpo_trainer import DataCollatorForPreference

from flywheel.llm.chat import (
    Prompt,
    PromptFormat,
    as_text_value,
    render_conversation,
    resolve_format,
)
from flywheel.llm.tokens import LengthReport, OverLength, ensure_pad_token, fit_to_length
from flywheel.reward_models.bradley_terry import (
    PreferenceDataError,
    clean_preferences,
    trl_settings,
)

log = logging.getLogger(__name__)

Method = Literal["dpo", "ipo", "gr-dpo", "gr-ipo"]
METHODS: tuple[str, ...] = get_args(Method)
TRL_LOSS = {"dpo": "sigmoid", "ipo": "ipo"}  # TRL's names for the two losses
PAIR_TEXTS = ("prompt", "chosen", "rejected")


class GroupDataError(PreferenceDataError):
    """Group data that cannot be used; the message names the column or the group."""


class GroupRobustConfig(BaseModel):
    """One preference-optimisation run: the method, TRL's settings and the robust options."""

    method: Method = "gr-dpo"
    base_model: str = Field(description="folder or hub name of the causal LM policy")
    beta: float = Field(0.1, gt=0, description="DPO temperature; IPO's tau")
    learning_rate: float = Field(1e-4, gt=0)
    batch_size: int = Field(32, ge=2)
    epochs: float = Field(1.0, gt=0)
    max_steps: int = Field(-1, description="overrides epochs when > 0")
    max_length: int = Field(
        128, ge=8, description="tokens of prompt + answer, in training and evaluation"
    )
    over_length: OverLength = Field(
        "truncate",
        description="a longer pair: 'truncate' (the prompt's start first, then the answers' "
        "end) or 'drop'; either way counted per group",
    )
    prompt_format: PromptFormat = Field(
        "auto",
        description="chat: render with the tokenizer's chat template; raw: text as it is; "
        "auto: chat when the tokenizer has a template",
    )
    eta_q: float = Field(
        0.5, ge=0, description="step size of the group weights' update; 0: fixed uniform weights"
    )
    size_adjustment: float = Field(
        0.0, ge=0, description="C of the size-adjusted group loss l_g + C/sqrt(n_g); 0: off"
    )
    chi: float = Field(
        1.0, ge=0, le=1, description="trade-off: 1 = worst group only, 0 = plain average"
    )
    seed: int = 0

    @property
    def loss(self) -> Literal["dpo", "ipo"]:
        return "ipo" if self.method.endswith("ipo") else "dpo"

    @property
    def robust(self) -> bool:
        return self.method.startswith("gr-")


def check_groups(
    rows: Sequence[dict], group_column: str, source: str, expected: Sequence[str] | None = None
) -> tuple[list[dict], dict]:
    """Usable pairs, each with a `group`; stops on what no training could use.

    Errors: the group column missing, rows without a group, fewer than two groups,
    or an expected group with no usable pair. Pairs with empty or identical texts
    are kept out and reported, as for reward models.
    """
    if rows and group_column not in rows[0]:
        raise GroupDataError(
            f"{source}: group column {group_column!r} missing (columns present: "
            f"{sorted(rows[0])}); set `group_column` to the column that names each pair's "
            "group, or add one"
        )
    ungrouped = [i for i, r in enumerate(rows) if r[group_column] in (None, "")]
    if ungrouped:
        raise GroupDataError(
            f"{source}: {len(ungrouped)} row(s) have an empty {group_column!r} (e.g. row "
            f"{ungrouped[0]}); fill the group of every pair or drop those rows"
        )
    kept, report = clean_preferences(rows, source)
    kept = [{**r, "group": str(r[group_column])} for r in kept]
    sizes: dict[str, int] = {}
    for r in kept:
        sizes[r["group"]] = sizes.get(r["group"], 0) + 1
    report["group_sizes"] = dict(sorted(sizes.items()))
    empty = [g for g in expected or () if g not in sizes]
    if empty:
        raise GroupDataError(
            f"{source}: group(s) {empty} have no usable pairs (groups with pairs: "
            f"{report['group_sizes']}); add pairs for them or leave them out of `groups`"
        )
    if len(sizes) < 2:
        raise GroupDataError(
            f"{source}: only group(s) {sorted(sizes)} in {group_column!r}; group robust "
            "optimisation needs pairs from at least two groups (use plain DPO otherwise)"
        )
    return kept, report


def _text_ids(
    tok: Any, prompt: Prompt, answer: Prompt, fmt: Literal["raw", "chat"]
) -> tuple[list[int], list[int]]:
    """Prompt ids and answer ids, tokenized apart so the boundary is exact (as a backend
    scores a completion). Raw answers end with EOS; a chat template closes the turn."""
    prompt_text, answer_text = render_conversation(tok, prompt, answer, fmt)
    # a rendered template already holds its special tokens (BOS included)
    prompt_ids = tok(prompt_text, add_special_tokens=fmt != "chat")["input_ids"]
    answer_ids = tok(answer_text, add_special_tokens=False)["input_ids"]
    return prompt_ids, answer_ids + ([tok.eos_token_id] if fmt != "chat" else [])


def encode_pairs(
    tok: Any, rows: Sequence[dict], config: GroupRobustConfig, source: str
) -> tuple[list[dict], dict]:
    """Grouped pairs (see `check_groups`) as TRL's preference collator reads them:
    `prompt_ids`, `chosen_ids`, `rejected_ids` (and `group`), each pair within
    `config.max_length`, and the length report {"all": ..., "by_group": {g: ...}}.

    A pair counts once: cut (or dropped) when its prompt and longer answer do not fit;
    a cut prompt loses its start, so both answers keep the same context.
    """
    fmt = resolve_format(config.prompt_format, tok)
    by_group: dict[str, LengthReport] = {}
    encoded = []
    for i, row in enumerate(rows):
        texts = {c: as_text_value(row[c], where=f"{source}: row {i} {c!r}") for c in PAIR_TEXTS}
        prompt_ids, chosen = _text_ids(tok, texts["prompt"], texts["chosen"], fmt)
        _, rejected = _text_ids(tok, texts["prompt"], texts["rejected"], fmt)
        report = by_group.setdefault(
            row["group"], LengthReport(config.max_length, config.over_length)
        )
        fitted = fit_to_length(prompt_ids, max(chosen, rejected, key=len), report)
        if fitted is None:
            continue
        ids, kept_prompt = fitted
        room = config.max_length - kept_prompt  # the longer answer is already cut to it
        encoded.append(
            {
                "prompt_ids": ids[:kept_prompt],
                "chosen_ids": chosen[:room],
                "rejected_ids": rejected[:room],
                "group": row["group"],
            }
        )
    reports = dict(sorted(by_group.items()))
    total = LengthReport(config.max_length, config.over_length)
    for report in reports.values():
        total = total.merge(report)
    if total.truncated or total.dropped:
        log.warning(
            "%s: %d of %d pair(s) longer than max_length=%d were %s",
            source,
            total.truncated + total.dropped,
            total.texts,
            config.max_length,
            "dropped" if config.over_length == "drop" else "truncated",
        )
    emptied = [g for g, r in reports.items() if r.dropped == r.texts]
    if emptied:
        raise GroupDataError(
            f"{source}: every pair of group(s) {emptied} is longer than max_length="
            f"{config.max_length} tokens and over_length is 'drop'; raise `max_length` or "
            "set `over_length` to 'truncate'"
        )
    length = {"all": total.as_dict(), "by_group": {g: r.as_dict() for g, r in reports.items()}}
    return encoded, length


class PretokenizedDPOTrainer(DPOTrainer):
    """`DPOTrainer` on pairs that `encode_pairs` tokenized and fitted to max_length.

    TRL's own preparation would tokenize prompt + answer together and cut on its own
    terms (keep_start: an answer loses its end, and a pair whose prompt fills max_length
    is filtered out, uncounted), so it would not match the counts we report: it is
    skipped, and the collator gets max_length=None, as there is nothing left to cut.
    """

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        if "prompt_ids" not in dataset.column_names:
            raise ValueError(
                f"{dataset_name} dataset: pairs must be tokenized first (encode_pairs)"
            )
        return dataset


@dataclass
class GroupPreferenceCollator(DataCollatorForPreference):
    """TRL's preference collator, plus each pair's group index."""

    def torch_call(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        batch = super().torch_call(examples)
        batch["group_id"] = torch.tensor([e["group_id"] for e in examples], dtype=torch.long)
        return batch


def pair_losses(
    chosen_logratios,
    rejected_logratios,
    chosen_lengths,
    rejected_lengths,
    loss: Literal["dpo", "ipo"],
    beta: float,
):
    """Per-pair loss and margin (margin > 0: the chosen answer is preferred).

    DPO: -log sigmoid(beta * margin) on summed log-ratios. IPO: (margin - 1/(2 beta))^2
    on log-ratios averaged per completion token, as TRL's IPO does.
    """
    import torch.nn.functional as F

    if loss == "dpo":
        margin = chosen_logratios - rejected_logratios
        return -F.logsigmoid(beta * margin), margin
    margin = chosen_logratios / chosen_lengths.clamp(min=1) - rejected_logratios / (
        rejected_lengths.clamp(min=1)
    )
    return (margin - 1 / (2 * beta)) ** 2, margin


class GroupRobustDPOTrainer(PretokenizedDPOTrainer):
    """`DPOTrainer` whose loss is the group-weighted min-max objective of GR-DPO/GR-IPO.

    The train dataset needs an integer `group_id` column (0..len(groups)-1).
    `history` holds one entry per training step: the group weights after the update
    and each present group's loss and accuracy, for plots and artifacts.
    """

    def __init__(
        self,
        *args: Any,
        groups: Sequence[str],
        group_sizes: Sequence[int],
        robust: GroupRobustConfig,
        **kwargs: Any,
    ) -> None:
        import torch

        self.groups = list(groups)
        self.robust_config = robust
        sizes = torch.tensor([float(n) for n in group_sizes])
        self.size_adjustment = robust.size_adjustment / sizes.clamp(min=1).sqrt()
        self.log_q = torch.full((len(groups),), -math.log(len(groups)))  # uniform start
        self.history: list[dict] = []
        super().__init__(*args, **kwargs)

    def _set_signature_columns_if_needed(self) -> None:
        super()._set_signature_columns_if_needed()
        if "group_id" not in self._signature_columns:
            self._signature_columns = [*self._signature_columns, "group_id"]

    @property
    def group_weights(self) -> list[float]:
        return self.log_q.exp().tolist()

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        import torch

        training = self.model.training
        mode = "train" if training else "eval"
        group_id = inputs.pop("group_id")
        completion_mask = inputs["completion_mask"]
        shift_mask = completion_mask[..., 1:]
        labels = inputs["input_ids"].masked_fill(completion_mask == 0, -100)
        outputs = model(
            input_ids=inputs["input_ids"],
            attention_mask=inputs["attention_mask"],
            labels=labels,
            fused_lm_head=True,  # TRL's patched head: token log-probs without full logits
            use_cache=False,
        )
        logps = (outputs.log_probs[:, -shift_mask.size(1) :] * shift_mask).sum(dim=1)
        chosen_logps, rejected_logps = logps.chunk(2, dim=0)
        if self.precompute_ref_logps:
            ref_chosen, ref_rejected = inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]
        else:
            # TRL's reference: its own copy, or (LoRA) the policy with the adapter disabled
            ref_chosen, ref_rejected = self.compute_ref_log_probs(self.ref_model or model, inputs)
        chosen_len, rejected_len = completion_mask.sum(dim=1).chunk(2, dim=0)
        per_pair, margin = pair_losses(
            chosen_logps - ref_chosen,
            rejected_logps - ref_rejected,
            chosen_len,
            rejected_len,
            self.robust_config.loss,
            self.beta,
        )

        n_groups = len(self.groups)
        device = per_pair.device
        counts = torch.bincount(group_id, minlength=n_groups).to(device)
        present = counts > 0
        group_loss = torch.zeros(n_groups, device=device).index_add(0, group_id, per_pair)
        group_loss = group_loss / counts.clamp(min=1)
        correct = (margin.detach() > 0).float()
        group_acc = torch.zeros(n_groups, device=device).index_add(0, group_id, correct)
        group_acc = group_acc / counts.clamp(min=1)

        if training:  # exponentiated gradient on the (size-adjusted) group losses
            with torch.no_grad():
                step = group_loss.detach().cpu() + self.size_adjustment
                self.log_q = torch.where(
                    present.cpu(), self.log_q + self.robust_config.eta_q * step, self.log_q
                )
                self.log_q = self.log_q - torch.logsumexp(self.log_q, dim=0)
        q = self.log_q.exp().to(device) * present
        robust_loss = (q * group_loss).sum() / q.sum()
        chi = self.robust_config.chi
        loss = chi * robust_loss + (1 - chi) * per_pair.mean() if chi < 1 else robust_loss

        # TRL averages what is in _metrics at each logging step
        metrics = self._metrics[mode]
        weights = self.log_q.exp().tolist()
        for g, name in enumerate(self.groups):
            metrics[f"group_weight/{name}"].append(weights[g])
            if present[g]:
                metrics[f"group_loss/{name}"].append(group_loss[g].item())
                metrics[f"group_accuracy/{name}"].append(group_acc[g].item())
        metrics["rewards/accuracies"].append(correct.mean().item())
        metrics["worst_group_loss"].append(group_loss[present].max().item())
        if training:
            self.history.append(
                {
                    "step": len(self.history) + 1,
                    "weights": dict(zip(self.groups, weights, strict=True)),
                    "loss": {
                        n: group_loss[g].item() for g, n in enumerate(self.groups) if present[g]
                    },
                    "accuracy": {
                        n: group_acc[g].item() for g, n in enumerate(self.groups) if present[g]
                    },
                }
            )
        if return_outputs:
            return loss, outputs
        return loss


def _trl_args(config: GroupRobustConfig, out_dir: Path) -> DPOConfig:
    # max_length None: encode_pairs fitted every pair (see PretokenizedDPOTrainer)
    return DPOConfig(
        **trl_settings(config, out_dir, logging_steps=10),
        loss_type=[TRL_LOSS[config.loss]],
        beta=config.beta,
        max_steps=config.max_steps,
    )


def load_tokenizer(base_model: str) -> Any:
    """The policy's tokenizer, with a pad token (a stand-in when it has none)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base_model)
    ensure_pad_token(tok)
    return tok


def make_trainer(
    train_rows: Sequence[dict], config: GroupRobustConfig, out_dir: str | Path
) -> DPOTrainer:
    """A TRL trainer for `config.method` on checked, grouped rows (see `check_groups`):
    `PretokenizedDPOTrainer` for dpo/ipo, `GroupRobustDPOTrainer` for gr-dpo/gr-ipo.
    The trainer's `length` holds the training pairs' length report (`encode_pairs`)."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM

    tok = load_tokenizer(config.base_model)
    model = AutoModelForCausalLM.from_pretrained(config.base_model)
    args = _trl_args(config, Path(out_dir))
    pairs, length = encode_pairs(tok, train_rows, config, "train pairs")
    columns = ("prompt_ids", "chosen_ids", "rejected_ids")
    rows = [{c: r[c] for c in columns} for r in pairs]
    if config.robust:
        groups = sorted({r["group"] for r in pairs})
        index = {g: i for i, g in enumerate(groups)}
        for row, pair in zip(rows, pairs, strict=True):
            row["group_id"] = index[pair["group"]]
        trainer = GroupRobustDPOTrainer(
            model=model,
            args=args,
            train_dataset=Dataset.from_list(rows),
            processing_class=tok,
            data_collator=GroupPreferenceCollator(pad_token_id=tok.pad_token_id),
            groups=groups,
            group_sizes=[sum(1 for r in pairs if r["group"] == g) for g in groups],
            robust=config,
        )
    else:
        trainer = PretokenizedDPOTrainer(
            model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok
        )
    trainer.length = length
    return trainer


def completion_logps(
    model,
    pad_token_id: int,
    prompts: Sequence[Sequence[int]],
    completions: Sequence[Sequence[int]],
    batch_size: int = 64,
):
    """Summed log-probability of each completion's ids after its prompt's, and its length
    (the ids as `encode_pairs` gives them)."""
    import torch

    out, lengths = [], []
    model.eval()
    with torch.no_grad():
        for start in range(0, len(prompts), batch_size):
            encoded = [
                ([*p, *c], len(p))
                for p, c in zip(
                    prompts[start : start + batch_size],
                    completions[start : start + batch_size],
                    strict=True,
                )
            ]
            width = max(len(ids) for ids, _ in encoded)
            ids = torch.full((len(encoded), width), pad_token_id)
            mask = torch.zeros((len(encoded), width), dtype=torch.long)
            target = torch.zeros((len(encoded), width), dtype=torch.bool)
            for i, (seq, prompt_len) in enumerate(encoded):
                ids[i, : len(seq)] = torch.tensor(seq)
                mask[i, : len(seq)] = 1
                target[i, prompt_len : len(seq)] = True
            ids, mask, target = ids.to(model.device), mask.to(model.device), target.to(model.device)
            logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
            token_logps = logits.log_softmax(-1).gather(-1, ids[:, 1:, None])[..., 0]
            out += (token_logps * target[:, 1:]).sum(dim=1).tolist()
            lengths += target[:, 1:].sum(dim=1).tolist()
    return out, lengths


def evaluate_groups(
    policy,
    reference,
    pad_token_id: int,
    rows: Sequence[dict],
    loss: Literal["dpo", "ipo"],
    beta: float,
) -> dict:
    """Preference accuracy and loss per group on held-out pairs (tokenized and fitted
    to max_length by `encode_pairs`, as in training).

    A pair counts as correct when the policy's implicit reward margin (the one its
    loss uses: summed log-ratios for DPO, per-token for IPO) prefers the chosen answer.
    Returns per-group figures, the worst group, the mean over pairs and over groups.
    """
    import torch

    prompts = [r["prompt_ids"] for r in rows]
    figures: dict[str, list[float]] = {}
    for name, model in (("policy", policy), ("reference", reference)):
        for side in ("chosen", "rejected"):
            logps, lengths = completion_logps(
                model, pad_token_id, prompts, [r[f"{side}_ids"] for r in rows]
            )
            figures[f"{name}_{side}"] = logps
            figures[f"{side}_len"] = lengths
    chosen_lr = torch.tensor(figures["policy_chosen"]) - torch.tensor(figures["reference_chosen"])
    rejected_lr = torch.tensor(figures["policy_rejected"]) - torch.tensor(
        figures["reference_rejected"]
    )
    losses, margins = pair_losses(
        chosen_lr,
        rejected_lr,
        torch.tensor(figures["chosen_len"]),
        torch.tensor(figures["rejected_len"]),
        loss,
        beta,
    )
    by_group: dict[str, dict] = {}
    for r, pair_loss, margin in zip(rows, losses.tolist(), margins.tolist(), strict=True):
        entry = by_group.setdefault(r["group"], {"pairs": 0, "correct": 0, "loss": 0.0})
        entry["pairs"] += 1
        entry["correct"] += margin > 0
        entry["loss"] += pair_loss
    groups = {
        g: {
            "pairs": e["pairs"],
            "accuracy": e["correct"] / e["pairs"],
            "loss": e["loss"] / e["pairs"],
        }
        for g, e in sorted(by_group.items())
    }
    worst = min(groups, key=lambda g: groups[g]["accuracy"])
    return {
        "groups": groups,
        "worst_group": worst,
        "worst_group_accuracy": groups[worst]["accuracy"],
        "worst_group_loss": max(e["loss"] for e in groups.values()),
        "accuracy": sum(e["correct"] for e in by_group.values()) / len(rows),
        "group_mean_accuracy": sum(e["accuracy"] for e in groups.values()) / len(groups),
    }


def train_group_robust(
    train_rows: Sequence[dict],
    eval_rows: Sequence[dict],
    config: GroupRobustConfig,
    out_dir: str | Path,
    group_column: str = "group",
    groups: Sequence[str] | None = None,
) -> dict:
    """Train `config.method` with TRL, save the policy to out_dir, evaluate per group.

    Returns the data reports, the length reports of training and held-out pairs
    (`length`: {"train"|"eval": {"all": ..., "by_group": {g: ...}}}), training figures
    (steps, steps/s, the group weights' history for robust methods) and held-out
    figures per group.
    """
    import torch
    from transformers import AutoModelForCausalLM

    train, train_report = check_groups(train_rows, group_column, "train pairs", groups)
    evaluation, eval_report = check_groups(eval_rows, group_column, "eval pairs", groups)
    missing = sorted({r["group"] for r in evaluation} - {r["group"] for r in train})
    if missing:
        raise GroupDataError(
            f"eval pairs: group(s) {missing} have no training pairs; add training pairs "
            "for them or leave them out of the evaluation"
        )
    out_dir = Path(out_dir)
    held_out_pairs, eval_length = encode_pairs(
        load_tokenizer(config.base_model), evaluation, config, "eval pairs"
    )
    torch.manual_seed(config.seed)
    trainer = make_trainer(train, config, out_dir)
    result = trainer.train()
    trainer.model.save_pretrained(out_dir)
    trainer.processing_class.save_pretrained(out_dir)
    reference = AutoModelForCausalLM.from_pretrained(config.base_model).to(trainer.model.device)
    held_out = evaluate_groups(
        trainer.model,
        reference,
        trainer.processing_class.pad_token_id,
        held_out_pairs,
        config.loss,
        config.beta,
    )
    history = getattr(trainer, "history", [])
    report = {
        "method": config.method,
        "config": config.model_dump(),
        "train_data": train_report,
        "eval_data": eval_report,
        "length": {"train": trainer.length, "eval": eval_length},
        "steps": result.global_step,
        "train_seconds": result.metrics["train_runtime"],
        "steps_per_second": result.metrics["train_steps_per_second"],
        "final_group_weights": history[-1]["weights"] if history else None,
        "held_out": held_out,
    }
    log.info(
        "%s: worst group %s %.3f, accuracy %.3f",
        config.method,
        held_out["worst_group"],
        held_out["worst_group_accuracy"],
        held_out["accuracy"],
    )
    return {**report, "history": history}


def plot_history(history: Sequence[dict], path: str | Path, title: str = "") -> Path:
    """A PNG of the group weights and the group losses over training steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = sorted({g for h in history for g in h["weights"]})
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
    for g in groups:
        top.plot([h["step"] for h in history], [h["weights"][g] for h in history], label=g)
        points = [(h["step"], h["loss"][g]) for h in history if g in h["loss"]]
        bottom.plot(*zip(*points, strict=True), label=g, alpha=0.8)
    top.set_ylabel("group weight q")
    bottom.set_ylabel("group loss (batch)")
    bottom.set_xlabel("training step")
    top.legend()
    top.set_title(title or "group weights and losses")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path
