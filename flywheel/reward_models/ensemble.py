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

import torch
from pydantic import BaseModel, Field
from torch import nn

from flywheel.reward_models.bradley_terry import clean_preferences, encode_texts

log = logging.getLogger(__name__)

HEADS_FILE = "ensemble_heads.pt"
META_FILE = "ensemble.json"


class EnsembleConfig(BaseModel):
    base_model: str = Field(description="folder or hub name of the causal LM backbone")
    members: int = Field(3, ge=2, le=32)
    epochs: float = Field(1.0, gt=0)
    learning_rate: float = Field(1e-3, gt=0)
    batch_size: int = Field(32, ge=1)
    bootstrap: bool = Field(True, description="Poisson(1) pair weights per member")
    seed: int = 0


class SharedBackboneEnsemble(nn.Module):
    """Backbone hidden state at the last real token -> K rewards."""

    def __init__(self, backbone: nn.Module, hidden_size: int, members: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.heads = nn.Linear(hidden_size, members)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask)
        last = attention_mask.sum(dim=1) - 1  # right padding: the last real token
        states = hidden.last_hidden_state[torch.arange(len(last)), last]
        return self.heads(states)  # (batch, members)


def _load(base_model: str | Path, members: int):
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base_model)
    backbone = AutoModel.from_pretrained(base_model)
    return tok, SharedBackboneEnsemble(backbone, backbone.config.hidden_size, members)


def load_ensemble(path: str | Path) -> tuple:
    """(tokenizer, model, meta) of a saved ensemble: backbone and heads as trained."""
    path = Path(path)
    if not (path / META_FILE).exists():
        raise FileNotFoundError(
            f"{path} is not a Flywheel reward ensemble ({META_FILE} missing); "
            "train one with train_ensemble"
        )
    meta = json.loads((path / META_FILE).read_text())
    tok, model = _load(path, meta["members"])
    model.heads.load_state_dict(torch.load(path / HEADS_FILE, weights_only=True))
    return tok, model, meta


def pairwise_accuracy(model: SharedBackboneEnsemble, tok, rows: Sequence[dict]) -> dict:
    """Per member and for the members' mean: share of pairs with r_chosen > r_rejected."""
    chosen = score_texts(model, tok, [r["prompt"] + r["chosen"] for r in rows])
    rejected = score_texts(model, tok, [r["prompt"] + r["rejected"] for r in rows])
    wins = chosen > rejected
    return {
        "members": wins.float().mean(dim=0).tolist(),
        "mean": (chosen.mean(dim=1) > rejected.mean(dim=1)).float().mean().item(),
    }


def score_texts(
    model: SharedBackboneEnsemble, tok, texts: Sequence[str], batch_size: int = 64
) -> torch.Tensor:
    model.eval()
    device = next(model.parameters()).device
    out = []
    with torch.no_grad():
        for start in range(0, len(texts), batch_size):
            out.append(model(**encode_texts(tok, texts[start : start + batch_size], device)))
    return torch.cat(out).float().cpu()


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
    """
    train, train_report = clean_preferences(train_rows, "train pairs")
    evaluation, eval_report = clean_preferences(eval_rows, "eval pairs")
    torch.manual_seed(config.seed)
    rng = random.Random(config.seed)
    if init_from is None:
        tok, model = _load(config.base_model, config.members)
    else:
        tok, model, init_meta = load_ensemble(init_from)
        if init_meta["members"] != config.members:
            raise ValueError(
                f"init_from {init_from} has {init_meta['members']} members but "
                f"config.members is {config.members}; set members={init_meta['members']}"
            )
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=config.learning_rate)
    steps = max(1, int(config.epochs * len(train) / config.batch_size))
    poisson = torch.distributions.Poisson(torch.ones(config.members))
    started = time.monotonic()
    for step in range(steps):
        batch = [train[rng.randrange(len(train))] for _ in range(config.batch_size)]
        both = encode_texts(
            tok,
            [r["prompt"] + r["chosen"] for r in batch]
            + [r["prompt"] + r["rejected"] for r in batch],
            device,
        )
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
    train_scores = score_texts(
        model, tok, [r["prompt"] + r[k] for k in ("chosen", "rejected") for r in train]
    )
    figures = {
        "members": config.members,
        "steps": steps,
        "train_seconds": seconds,
        "train_pairs_per_second": steps * config.batch_size / seconds,
        "eval_pairwise_accuracy": pairwise_accuracy(model, tok, evaluation),
        "reward_mean": train_scores.mean(dim=0).tolist(),
        "reward_std": train_scores.std(dim=0).clamp_min(1e-6).tolist(),
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
    """A saved ensemble: per-member rewards (normalised per member), their mean and variance."""

    def __init__(self, path: str | Path) -> None:
        self.tok, self.model, self.meta = load_ensemble(path)
        self.model.eval()

    def score(self, prompts: Sequence[str], completions: Sequence[str]) -> dict:
        if len(prompts) != len(completions):
            raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
        texts = [p + c for p, c in zip(prompts, completions, strict=True)]
        raw = score_texts(self.model, self.tok, texts)
        rewards = (raw - torch.tensor(self.meta["reward_mean"])) / torch.tensor(
            self.meta["reward_std"]
        )
        return {
            "members": rewards.tolist(),
            "mean": rewards.mean(dim=1).tolist(),
            "variance": rewards.var(dim=1, unbiased=False).tolist(),
        }
