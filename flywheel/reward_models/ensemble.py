"""A reward-model ensemble whose K members share one backbone: K scalar heads.

One forward pass of the backbone serves every member, so K members cost
little more than one model to train and to score. Members differ by their
head's initialisation and by an online bootstrap: each pair gets a
Poisson(1) weight per member, so every member sees its own resample of the
data. Each member is trained with the Bradley-Terry loss
-log sigmoid(r_chosen - r_rejected). TRL's RewardTrainer trains one head;
this several-headed loss is why this module has its own short loop.
"""

from __future__ import annotations

import json
import logging
import random
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field
from torch import nn

from flywheel.llm.chat import Prompt, PromptFormat, resolve_format
from flywheel.llm.tokens import LengthReport, position_limit
from flywheel.reward_models.bradley_terry import (
    PairEncoder,
    PairTrainingConfig,
    check_max_length,
    clean_preferences,
    pad_with_stand_in,
)

log = logging.getLogger(__name__)

HEADS_FILE = "ensemble_heads.pt"
META_FILE = "ensemble.json"
# where transformer backbones keep their stack of blocks: Llama/Qwen2 `layers`, GPT-2 `h`
BLOCK_NAMES = ("layers", "h", "blocks", "layer")


class EnsembleConfig(PairTrainingConfig):
    members: int = Field(3, ge=2, le=32)
    bootstrap: bool = Field(True, description="Poisson(1) pair weights per member")


class SharedBackboneEnsemble(nn.Module):
    """Backbone hidden state at the last real token -> K rewards.

    `prompt_format` and `max_length` say how it reads (prompt, answer): see `encoder_for`.
    """

    def __init__(
        self,
        backbone: nn.Module,
        hidden_size: int,
        members: int,
        prompt_format: Literal["raw", "chat"] = "raw",
        max_length: int = 128,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.heads = nn.Linear(hidden_size, members)
        self.prompt_format, self.max_length = prompt_format, max_length

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask)
        last = attention_mask.sum(dim=1) - 1  # right padding: the last real token
        states = hidden.last_hidden_state[torch.arange(len(last)), last]
        return self.heads(states)  # (batch, members)


def decoder_blocks(backbone: nn.Module) -> nn.ModuleList:
    """The backbone's stack of transformer blocks, for any architecture: a known attribute
    (`BLOCK_NAMES`) of the model, its base model or their `decoder`/`transformer`, else
    the longest ModuleList inside it."""
    base = getattr(backbone, "base_model", backbone)
    owners = [backbone, base]
    owners += [getattr(m, n, None) for m in (backbone, base) for n in ("decoder", "transformer")]
    for owner in owners:
        for name in BLOCK_NAMES:
            found = getattr(owner, name, None) if isinstance(owner, nn.Module) else None
            if isinstance(found, nn.ModuleList) and len(found):
                return found
    lists = [m for m in backbone.modules() if isinstance(m, nn.ModuleList) and len(m)]
    if not lists:
        raise ValueError(f"{type(backbone).__name__} has no list of transformer blocks")
    return max(lists, key=len)


def encoder_for(model: SharedBackboneEnsemble, tok: Any) -> PairEncoder:
    return PairEncoder(tok, model.prompt_format, model.max_length)


def _load(
    base_model: str | Path, members: int, prompt_format: PromptFormat, max_length: int | None
):
    """(tokenizer, ensemble, pad stand-in) on `base_model`; max_length None: the model's
    positions."""
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base_model)
    backbone = AutoModel.from_pretrained(base_model)
    stand_in = pad_with_stand_in(tok, backbone.config)
    if max_length is None:  # saved before max_length existed: nothing was cut then
        max_length = (
            position_limit(backbone.config)
            or getattr(backbone.config, "max_position_embeddings", None)
            or 2048
        )
    check_max_length(backbone.config, max_length, base_model)
    model = SharedBackboneEnsemble(
        backbone,
        backbone.config.hidden_size,
        members,
        resolve_format(prompt_format, tok),
        max_length,
    )
    return tok, model, stand_in


def load_ensemble(path: str | Path) -> tuple:
    """(tokenizer, model, meta) of a saved ensemble: backbone and heads as trained."""
    path = Path(path)
    if not (path / META_FILE).exists():
        raise FileNotFoundError(
            f"{path} is not a Flywheel reward ensemble ({META_FILE} missing); "
            "train one with train_ensemble"
        )
    meta = json.loads((path / META_FILE).read_text())
    # ensembles saved before prompt formats read prompt + answer as raw text
    tok, model, _ = _load(
        path, meta["members"], meta.get("prompt_format", "raw"), meta.get("max_length")
    )
    model.heads.load_state_dict(torch.load(path / HEADS_FILE, weights_only=True))
    return tok, model, meta


def _accuracy(chosen: torch.Tensor, rejected: torch.Tensor) -> dict:
    """Per member and for the members' mean, over all pairs: r_chosen > r_rejected counts
    1, a tie 0.5, r_chosen < r_rejected 0 (as `bradley_terry.pairwise_accuracy_of`)."""

    def share(c: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        return ((c > r).float() + 0.5 * (c == r).float()).mean(dim=0)

    return {
        "members": share(chosen, rejected).tolist(),
        "mean": share(chosen.mean(dim=1), rejected.mean(dim=1)).item(),
        "pairs": len(chosen),
    }


def pairwise_accuracy(model: SharedBackboneEnsemble, tok, rows: Sequence[dict]) -> dict:
    """Per member and for the members' mean: share of pairs with r_chosen > r_rejected
    (ties count half); `pairs`: how many. Texts longer than max_length are cut."""
    prompts = [r["prompt"] for r in rows]
    chosen = score_pairs(model, tok, prompts, [r["chosen"] for r in rows])
    rejected = score_pairs(model, tok, prompts, [r["rejected"] for r in rows])
    return _accuracy(chosen, rejected)


def score_ids(
    model: SharedBackboneEnsemble,
    encoder: PairEncoder,
    seqs: Sequence[list[int]],
    batch_size: int = 64,
) -> torch.Tensor:
    """(texts, members) raw rewards of tokenized texts."""
    model.eval()
    device = next(model.parameters()).device
    out = [torch.empty(0, model.heads.out_features)]
    with torch.no_grad():
        for start in range(0, len(seqs), batch_size):
            out.append(model(**encoder.batch(seqs[start : start + batch_size], device)).cpu())
    return torch.cat(out).float()


def score_pairs(
    model: SharedBackboneEnsemble,
    tok,
    prompts: Sequence[Prompt],
    answers: Sequence[Prompt],
    batch_size: int = 64,
) -> torch.Tensor:
    """(texts, members) raw rewards of each (prompt, answer), rendered and cut to
    max_length as in training."""
    encoder = encoder_for(model, tok)
    seqs, _ = encoder.encode(prompts, answers, "truncate", "score")
    return score_ids(model, encoder, seqs, batch_size)


def train_ensemble(
    train_rows: Sequence[dict],
    eval_rows: Sequence[dict],
    config: EnsembleConfig,
    out_dir: str | Path,
    init_from: str | Path | None = None,
) -> dict:
    """Train all members in one run; save backbone, heads and figures to out_dir.

    `init_from`: a saved ensemble to continue training (backbone and heads as
    saved there, e.g. to refine it on relabeled pairs); its member count must
    equal `config.members`. Without it, `config.base_model` gets fresh heads.
    Figures: `trained_pairs`, `length` per split (texts cut or left out for
    max_length), and `eval_pairwise_accuracy` over all eval pairs.
    """
    train, train_report = clean_preferences(train_rows, "train pairs")
    evaluation, eval_report = clean_preferences(eval_rows, "eval pairs")
    torch.manual_seed(config.seed)
    rng = random.Random(config.seed)
    if init_from is None:
        tok, model, stand_in = _load(
            config.base_model, config.members, config.prompt_format, config.max_length
        )
    else:
        tok, model, init_meta = load_ensemble(init_from)
        if init_meta["members"] != config.members:
            raise ValueError(
                f"init_from {init_from} has {init_meta['members']} members but "
                f"config.members is {config.members}; set members={init_meta['members']}"
            )
        stand_in = init_meta.get("pad_token_stand_in")
        check_max_length(model.backbone.config, config.max_length, init_from)
        model.prompt_format = resolve_format(config.prompt_format, tok)
        model.max_length = config.max_length
    encoder = encoder_for(model, tok)
    train_pairs, train_length = encoder.encode_pairs(train, config.over_length, "train pairs")
    eval_pairs, eval_length = encoder.encode_pairs(evaluation, config.over_length, "eval pairs")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=config.learning_rate)
    steps = max(1, int(config.epochs * len(train_pairs) / config.batch_size))
    poisson = torch.distributions.Poisson(torch.ones(config.members))
    started = time.monotonic()
    for step in range(steps):
        batch = [train_pairs[rng.randrange(len(train_pairs))] for _ in range(config.batch_size)]
        both = encoder.batch([c for _, c, _ in batch] + [r for _, _, r in batch], device)
        rewards = model(**both)  # (2 * batch, members)
        chosen, rejected = rewards[: len(batch)], rewards[len(batch) :]
        losses = -nn.functional.logsigmoid(chosen - rejected)  # (batch, members)
        if config.bootstrap:
            weights = poisson.sample((len(batch),)).to(device)
            losses = losses * weights
        loss = losses.mean(dim=0).sum()  # each member's mean loss, summed over members
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 50 == 0:
            log.info("ensemble step %d/%d loss %.4f", step, steps, loss.item() / config.members)
    seconds = time.monotonic() - started
    train_scores = score_ids(
        model, encoder, [c for _, c, _ in train_pairs] + [r for _, _, r in train_pairs]
    )
    eval_accuracy = _accuracy(
        score_ids(model, encoder, [c for _, c, _ in eval_pairs]),
        score_ids(model, encoder, [r for _, _, r in eval_pairs]),
    )
    figures = {
        "members": config.members,
        "steps": steps,
        "train_seconds": seconds,
        "train_pairs_per_second": steps * config.batch_size / seconds,
        "trained_pairs": len(train_pairs),
        "eval_pairwise_accuracy": eval_accuracy,
        "reward_mean": train_scores.mean(dim=0).tolist(),
        "reward_std": train_scores.std(dim=0).clamp_min(1e-6).tolist(),
        "prompt_format": model.prompt_format,
        "max_length": model.max_length,
        "pad_token_stand_in": stand_in,
        "length": {"train": train_length, "eval": eval_length},
        "config": config.model_dump(),
        "init_from": None if init_from is None else str(Path(init_from).absolute()),
    }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.backbone.save_pretrained(out)
    tok.save_pretrained(out)
    torch.save(model.heads.state_dict(), out / HEADS_FILE)
    (out / META_FILE).write_text(json.dumps(figures, indent=2))
    return {**figures, "train_rows": train_report, "eval_rows": eval_report}


class EnsembleRewardModel:
    """A saved ensemble: per-member rewards (normalised per member), their mean and variance.

    Texts are rendered and cut to max_length as in training; `length` counts what scoring
    has cut so far.
    """

    def __init__(self, path: str | Path) -> None:
        self.tok, self.model, self.meta = load_ensemble(path)
        self.model.eval()
        self.length = LengthReport(self.model.max_length)

    def score(self, prompts: Sequence[Prompt], completions: Sequence[Prompt]) -> dict:
        encoder = encoder_for(self.model, self.tok)
        seqs, report = encoder.encode(prompts, completions, "truncate", "score")
        self.length = self.length.merge(report)
        raw = score_ids(self.model, encoder, seqs)
        rewards = (raw - torch.tensor(self.meta["reward_mean"])) / torch.tensor(
            self.meta["reward_std"]
        )
        return {
            "members": rewards.tolist(),
            "mean": rewards.mean(dim=1).tolist(),
            "variance": rewards.var(dim=1, unbiased=False).tolist(),
        }
