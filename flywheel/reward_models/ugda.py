"""UGDA: policy-aware reward modeling with uncertainty-gradient based data augmentation.

A reward ensemble trained on one distribution of responses meets another once the
policy changes. One UGDA round keeps it on the policy's distribution:

1. sample two responses per prompt from the current policy: unlabeled pairs;
2. uncertainty: how much the ensemble's members disagree on each pair;
3. influence (LESS-style): how well a pair's Bradley-Terry loss gradient, randomly
   projected, aligns with the gradient of a small labelled validation set;
4. select the most uncertain `uncertain_fraction`, then the `budget` most
   influential of those;
5. relabel them (any `Labeler`: the world's oracle, an LLM judge, people);
6. refine the ensemble from its saved weights on the relabeled pairs.

Arms for comparison: "uncertainty+influence" (UGDA), "uncertainty", "random", "none".
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Literal, get_args

import torch
from pydantic import BaseModel, Field
from torch import nn

from flywheel.llm.base import Backend
from flywheel.reward_models.ensemble import (
    META_FILE,
    EnsembleConfig,
    EnsembleRewardModel,
    SharedBackboneEnsemble,
    decoder_blocks,
    encoder_for,
    load_ensemble,
    score_pairs,
    train_ensemble,
)
from flywheel.reward_models.labelers import Labeler

log = logging.getLogger(__name__)

Arm = Literal["uncertainty+influence", "uncertainty", "random", "none"]
ARMS: tuple[str, ...] = get_args(Arm)
GradParams = Literal["heads", "heads+last_layer"]
# a saved ensemble's folder, or a loaded one (anything with .tok and .model)
EnsembleLike = str | Path | EnsembleRewardModel


class UgdaConfigError(ValueError):
    """A config that does not fit the data (e.g. a budget above the candidates)."""


class UgdaConfig(BaseModel):
    arm: Arm = "uncertainty+influence"
    budget: int = Field(100, ge=1, description="pairs sent to the labeler")
    uncertain_fraction: float = Field(
        0.3, gt=0, le=1, description="share of candidates, most uncertain first, kept for influence"
    )
    projection_dim: int = Field(1024, ge=8, le=65536, description="random projection size")
    projection: Literal["rademacher", "gaussian"] = "rademacher"
    grad_params: GradParams = Field(
        "heads+last_layer", description="parameters whose loss gradient measures influence"
    )
    influence_sign: Literal["cosine", "abs_cosine"] = Field(
        "cosine", description="rank by the cosine to the validation gradient, or by |cosine|"
    )
    seed: int = 0
    refine_epochs: float = Field(10.0, gt=0)
    refine_lr: float = Field(1e-3, gt=0)
    refine_batch_size: int = Field(32, ge=1)
    replay: float = Field(
        1.0, ge=0, description="original pairs replayed per relabeled pair during refinement"
    )
    batch_size: int = Field(64, ge=1, description="pairs per forward pass when scoring")

    def influence_kwargs(self) -> dict:
        """These settings as `influence_scores` keywords."""
        names = {"projection_dim", "projection", "grad_params", "seed", "batch_size"}
        return {**self.model_dump(include=names), "sign": self.influence_sign}

    def check_candidates(self, n: int) -> int:
        """The number kept by the uncertainty filter; UgdaConfigError when the budget
        cannot be met from `n` candidates."""
        if self.arm == "none":
            return 0
        if self.budget > n:
            raise UgdaConfigError(
                f"budget: {self.budget} is more than the {n} candidate pairs; lower budget "
                "or sample more policy pairs"
            )
        pool = max(1, math.ceil(self.uncertain_fraction * n))
        if self.arm == "uncertainty+influence" and pool < self.budget:
            need = self.budget / n
            raise UgdaConfigError(
                f"uncertain_fraction: {self.uncertain_fraction} keeps {pool} of {n} candidates, "
                f"fewer than budget {self.budget}; raise uncertain_fraction to at least "
                f"{need:.3f} or lower budget"
            )
        return pool


# --- 1. policy samples ---


def pair_id(prompt: str, response_a: str, response_b: str) -> str:
    text = "\x1f".join((prompt, response_a, response_b))
    return hashlib.sha1(text.encode()).hexdigest()[:16]


def policy_pairs(
    policy: Backend,
    prompts: Sequence[str],
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    seed: int = 0,
    stop: Sequence[str] = ("\n",),
) -> tuple[list[dict], dict]:
    """Two sampled responses per prompt -> unlabeled pairs {id, prompt, response_a, response_b}.

    `max_new_tokens` fits the answers the prompts ask for, which only the caller knows
    (a one-line world answer is a few tokens; free text needs room).

    Skipped, and counted in the report: pairs whose two responses are identical
    (no preference), pairs with an empty response (reward training keeps empty
    text out, see `clean_preferences`, so labeling one would waste budget), and
    repeats of a pair already made.
    """
    if temperature <= 0:
        raise ValueError(
            f"temperature must be > 0 to sample two different responses, got {temperature}"
        )
    texts = list(prompts)
    bad = next((i for i, p in enumerate(texts) if not isinstance(p, str)), None)
    if bad is not None:
        raise TypeError(
            f"prompts: item {bad} is a {type(texts[bad]).__name__}, not text; pass each "
            "prompt's text (for world tasks, `task.prompt`)"
        )
    doubled = [t for t in texts for _ in range(2)]
    out = policy.generate(
        doubled, max_new_tokens=max_new_tokens, temperature=temperature, stop=list(stop), seed=seed
    )
    pairs: list[dict] = []
    seen: set[str] = set()
    identical = empty = repeated = 0
    for i, prompt in enumerate(texts):
        a, b = out[2 * i], out[2 * i + 1]
        if a == b:
            identical += 1
            continue
        if not a.strip() or not b.strip():
            empty += 1
            continue
        pid = pair_id(prompt, a, b)
        if pid in seen:
            repeated += 1
            continue
        seen.add(pid)
        pairs.append({"id": pid, "prompt": prompt, "response_a": a, "response_b": b})
    report = {
        "prompts": len(texts),
        "pairs": len(pairs),
        "identical": identical,
        "empty_response": empty,
        "repeated": repeated,
    }
    if identical:
        log.info(
            "policy pairs: %d of %d prompts gave two identical responses", identical, len(texts)
        )
    return pairs, report


# --- 2. uncertainty ---


def _ensemble(ensemble: EnsembleLike) -> tuple:
    """(tokenizer, model) from a saved ensemble's path or a loaded EnsembleRewardModel."""
    if isinstance(ensemble, str | Path):
        tok, model, _ = load_ensemble(ensemble)
        return tok, model
    return ensemble.tok, ensemble.model


def pair_preferences(ensemble: EnsembleLike, pairs: Sequence[dict], batch_size: int = 64) -> dict:
    """Each member's P_m(a > b) = sigmoid(r_a - r_b), their mean, and their variance.

    Uncertainty is the variance of the members' preference probabilities, not of
    their reward differences: the probability is what each member's Bradley-Terry
    loss trains, it is bounded, and the members' raw reward scales differ, so a
    member with a large scale would dominate a variance of differences even when
    all members agree on the order.
    """
    tok, model = _ensemble(ensemble)
    prompts = [p["prompt"] for p in pairs]
    r_a = score_pairs(model, tok, prompts, [p["response_a"] for p in pairs], batch_size)
    r_b = score_pairs(model, tok, prompts, [p["response_b"] for p in pairs], batch_size)
    members = torch.sigmoid(r_a - r_b)  # (pairs, members)
    return {
        "members": members.tolist(),
        "mean": members.mean(dim=1).tolist(),
        "variance": members.var(dim=1, unbiased=False).tolist(),
    }


# --- 3. influence: per-sample gradients, random projection, cosine to validation ---


def _is_conv1d(module: nn.Module) -> bool:
    """GPT-2's projections: a linear layer with its weight stored (in, out)."""
    from transformers.pytorch_utils import Conv1D

    return isinstance(module, Conv1D)


def gradient_modules(model: SharedBackboneEnsemble, params: GradParams) -> list[nn.Module]:
    """The linear layers whose weights (and biases) make up a gradient, in order.

    "heads": the K reward heads. "heads+last_layer": also every linear layer of the
    backbone's last block (attention and MLP projections; GPT-2's Conv1D ones too), the
    layer LESS-style selection finds most informative; norms and embeddings are left out.
    """
    if params == "heads":
        return [model.heads]
    if params != "heads+last_layer":
        raise ValueError(f"grad_params must be 'heads' or 'heads+last_layer', got {params!r}")
    try:
        last = decoder_blocks(model.backbone)[-1]
    except ValueError as e:
        raise ValueError(f"grad_params: {e} to take the last from; use 'heads'") from e
    linears = [m for m in last.modules() if isinstance(m, nn.Linear) or _is_conv1d(m)]
    if not linears:
        raise ValueError(
            f"grad_params: the last block of {type(model.backbone).__name__} has no linear "
            "layers; use grad_params='heads'"
        )
    return [*linears, model.heads]


def gradient_parameters(model: SharedBackboneEnsemble, params: GradParams) -> list[nn.Parameter]:
    """The parameters of `gradient_modules`, in the order per-sample gradients flatten them."""
    out: list[nn.Parameter] = []
    for module in gradient_modules(model, params):
        out.append(module.weight)
        if module.bias is not None:
            out.append(module.bias)
    return out


def pairwise_loss(rewards: torch.Tensor, n: int) -> torch.Tensor:
    """Per-pair Bradley-Terry loss summed over members; rewards rows: n winners, n losers."""
    return -nn.functional.logsigmoid(rewards[:n] - rewards[n:]).sum(dim=1)


def per_sample_grads(
    model: SharedBackboneEnsemble,
    tok,
    rows: Sequence[dict],
    params: GradParams = "heads+last_layer",
    batch_size: int = 32,
) -> torch.Tensor:
    """(pairs, parameters): each (prompt, chosen, rejected) pair's own gradient of its
    Bradley-Terry loss (summed over members) w.r.t. the selected parameters.

    One forward and one backward per batch, not per pair: the backward of the
    summed loss gives each linear layer's output gradient per sequence, and a
    sequence's weight gradient is the sum over its tokens of output-gradient x input
    (bias: the output-gradient sum). A pair's gradient adds its two sequences'.
    Nothing mixes sequences in the backbone, so this is exact.
    """
    chunks = list(_grad_batches(model, tok, rows, params, batch_size))
    return torch.cat(chunks) if chunks else torch.empty(0)


def _grad_batches(model, tok, rows, params, batch_size):
    modules = gradient_modules(model, params)
    device = next(model.parameters()).device
    encoder = encoder_for(model, tok)
    wanted = {id(p) for m in modules for p in m.parameters(recurse=False)}
    saved_flags = [(p, p.requires_grad) for p in model.parameters()]
    # only the selected layers need a graph: the backbone below them runs without one
    for p, _ in saved_flags:
        p.requires_grad_(id(p) in wanted)
    # restored module by module: a loaded backbone sits in eval mode inside a train-mode wrapper
    training = [(m, m.training) for m in model.modules()]
    model.eval()
    records: list[tuple[nn.Module, torch.Tensor, torch.Tensor]] = []

    def keep(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        records.append((module, inputs[0].detach(), output))

    handles = [m.register_forward_hook(keep) for m in modules]
    try:
        for start in range(0, len(rows), batch_size):
            batch = rows[start : start + batch_size]
            n = len(batch)
            prompts = [r["prompt"] for r in batch] * 2
            answers = [r["chosen"] for r in batch] + [r["rejected"] for r in batch]
            seqs, _ = encoder.encode(prompts, answers, "truncate", "gradient pairs")
            records.clear()
            rewards = model(**encoder.batch(seqs, device))
            loss = pairwise_loss(rewards, n).sum()
            outputs = [out for _, _, out in records]
            grads_out = torch.autograd.grad(loss, outputs)
            # per module, in gradient_parameters order (and summed should a module run twice)
            per_module: dict[int, torch.Tensor] = {}
            for (module, x, _), g in zip(records, grads_out, strict=True):
                if g.dim() == 2:  # the heads: one vector (the last real token) per sequence
                    g, x = g.unsqueeze(1), x.unsqueeze(1)
                weight = torch.einsum("bto,bti->boi", g, x)
                if _is_conv1d(module):  # its weight is stored (in, out)
                    weight = weight.transpose(1, 2)
                per_seq = [weight.flatten(1)]
                if module.bias is not None:
                    per_seq.append(g.sum(dim=1))
                seq = torch.cat(per_seq, dim=1)
                pair = seq[:n] + seq[n:]  # a pair's gradient: its winner's + its loser's
                key = id(module)
                per_module[key] = per_module[key] + pair if key in per_module else pair
            parts = [per_module[id(m)] for m in modules]
            yield torch.cat(parts, dim=1).detach().cpu()
    finally:
        for h in handles:
            h.remove()
        for p, flag in saved_flags:
            p.requires_grad_(flag)
        for m, flag in training:
            m.train(flag)


class RandomProjection:
    """A fixed-seed random matrix (in_dim x out_dim), entries +-1/sqrt(out_dim)
    (Rademacher) or N(0, 1/out_dim): inner products and cosines are kept in
    expectation (Johnson-Lindenstrauss), as in LESS.

    The matrix is made block by block (`block` rows each, every block from its own
    seed), so it need not fit in memory and depends only on (seed, in_dim, out_dim).
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        seed: int = 0,
        kind: Literal["rademacher", "gaussian"] = "rademacher",
        block: int = 4096,
    ) -> None:
        if kind not in ("rademacher", "gaussian"):
            raise ValueError(f"projection must be 'rademacher' or 'gaussian', got {kind!r}")
        self.in_dim, self.out_dim, self.seed, self.kind, self.block = (
            in_dim,
            out_dim,
            seed,
            kind,
            block,
        )
        # up to 64M entries (256 MB) the matrix is kept; a larger one is remade per call
        self._cache: list[torch.Tensor] | None = [] if in_dim * out_dim <= 1 << 26 else None

    def _block(self, index: int) -> torch.Tensor:
        if self._cache and index < len(self._cache):
            return self._cache[index]
        rows = min(self.block, self.in_dim - index * self.block)
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        if self.kind == "rademacher":
            m = torch.randint(0, 2, (rows, self.out_dim), generator=gen).float() * 2 - 1
        else:
            m = torch.randn(rows, self.out_dim, generator=gen)
        m /= math.sqrt(self.out_dim)
        if self._cache is not None:
            self._cache.append(m)
        return m

    def __call__(self, grads: torch.Tensor) -> torch.Tensor:
        if grads.shape[-1] != self.in_dim:
            raise ValueError(
                f"gradients have {grads.shape[-1]} entries, projection expects {self.in_dim}"
            )
        out = torch.zeros(grads.shape[0], self.out_dim)
        for index in range(math.ceil(self.in_dim / self.block)):
            lo = index * self.block
            out += grads[:, lo : lo + self.block].float() @ self._block(index)
        return out


def projected_grads(
    model: SharedBackboneEnsemble,
    tok,
    rows: Sequence[dict],
    projection: RandomProjection,
    params: GradParams = "heads+last_layer",
    batch_size: int = 32,
) -> torch.Tensor:
    """(pairs, projection.out_dim): per-sample gradients, projected a chunk of pairs at a
    time (up to 32M gradient entries) so that all pairs' full gradients are never held."""
    out: list[torch.Tensor] = []
    pending: list[torch.Tensor] = []
    for grads in _grad_batches(model, tok, rows, params, batch_size):
        pending.append(grads)
        if sum(g.numel() for g in pending) >= 1 << 25:
            out.append(projection(torch.cat(pending)))
            pending = []
    if pending:
        out.append(projection(torch.cat(pending)))
    return torch.cat(out) if out else torch.empty(0, projection.out_dim)


def pseudo_labeled(pairs: Sequence[dict], p_mean: Sequence[float]) -> list[dict]:
    """Candidates are unlabeled: their gradient uses the ensemble mean's own preference
    (a wins when mean P(a > b) >= 0.5)."""
    return [
        {
            "prompt": p["prompt"],
            "chosen": p["response_a"] if q >= 0.5 else p["response_b"],
            "rejected": p["response_b"] if q >= 0.5 else p["response_a"],
        }
        for p, q in zip(pairs, p_mean, strict=True)
    ]


def influence_scores(
    ensemble: EnsembleLike,
    candidates: Sequence[dict],
    validation_rows: Sequence[dict],
    *,
    p_mean: Sequence[float] | None = None,
    projection_dim: int = 1024,
    projection: Literal["rademacher", "gaussian"] = "rademacher",
    grad_params: GradParams = "heads+last_layer",
    sign: Literal["cosine", "abs_cosine"] = "cosine",
    seed: int = 0,
    batch_size: int = 32,
) -> list[float]:
    """Cosine of each candidate's projected loss gradient to the validation direction.

    The validation direction is the mean projected gradient of the validation pairs,
    i.e. the projected gradient of the validation loss: validation pairs the model
    gets badly wrong weigh most. (LESS averages cosines to each validation example,
    which weighs them equally; on the world benchmark the two selected about as well.)
    Candidates are unlabeled, so their gradient uses the ensemble mean's own
    preference as the label (`p_mean`, computed when not given).

    `sign="abs_cosine"` scores |cosine|. Why offer it: with the model's own label,
    a pair the model gets wrong has a gradient pointing roughly opposite to the one
    its true label will give, so the signed cosine favours pairs the model already
    ranks as the validation set wants; the absolute value asks only how strongly a
    pair's label bears on the validation loss, either way.
    """
    if not validation_rows:
        raise ValueError("influence needs at least one labelled validation pair")
    tok, model = _ensemble(ensemble)
    if p_mean is None:
        p_mean = pair_preferences(_Loaded(tok, model), candidates, batch_size)["mean"]
    dim = sum(p.numel() for p in gradient_parameters(model, grad_params))
    proj = RandomProjection(dim, projection_dim, seed=seed, kind=projection)
    val = projected_grads(model, tok, validation_rows, proj, grad_params, batch_size)
    direction = val.mean(dim=0)
    cand = projected_grads(
        model, tok, pseudo_labeled(candidates, p_mean), proj, grad_params, batch_size
    )
    cosine = nn.functional.cosine_similarity(cand, direction.unsqueeze(0), dim=1)
    return (cosine.abs() if sign == "abs_cosine" else cosine).tolist()


class _Loaded:
    """A (tokenizer, model) pair shaped like an EnsembleRewardModel."""

    def __init__(self, tok, model: SharedBackboneEnsemble) -> None:
        self.tok, self.model = tok, model


# --- 4. selection ---


def uncertain_pool(variance: Sequence[float], config: UgdaConfig) -> list[int]:
    """Indices of the top `uncertain_fraction` of candidates by variance, most uncertain
    first: the only ones whose influence "uncertainty+influence" needs."""
    pool = max(1, math.ceil(config.uncertain_fraction * len(variance)))
    return sorted(range(len(variance)), key=lambda i: (-variance[i], i))[:pool]


def select(
    variance: Sequence[float],
    influence: Sequence[float | None] | None,
    config: UgdaConfig,
) -> list[int]:
    """Indices of the candidates to relabel, by `config.arm`:

    - "uncertainty+influence": the top `uncertain_fraction` by variance, then the
      top `budget` of those by influence (`influence[i]` may be None outside that pool);
    - "uncertainty": the top `budget` by variance;
    - "random": `budget` uniformly at random (seeded);
    - "none": nothing.
    """
    n = len(variance)
    config.check_candidates(n)
    if config.arm == "none":
        return []
    if config.arm == "random":
        return sorted(random.Random(config.seed).sample(range(n), config.budget))
    if config.arm == "uncertainty":
        return uncertain_pool(variance, config.model_copy(update={"uncertain_fraction": 1.0}))[
            : config.budget
        ]
    pool = uncertain_pool(variance, config)
    if influence is None or len(influence) != n or any(influence[i] is None for i in pool):
        raise ValueError(
            "arm 'uncertainty+influence' needs an influence score for every candidate in "
            "the uncertain pool (see uncertain_pool)"
        )
    return sorted(pool, key=lambda i: (-influence[i], i))[: config.budget]


def score_candidates(
    ensemble: EnsembleLike,
    candidates: Sequence[dict],
    validation_rows: Sequence[dict],
    config: UgdaConfig,
) -> dict:
    """The scores `select` needs: each candidate's member preferences, their mean and
    variance, and (for "uncertainty+influence") the influence of the candidates in the
    uncertain pool (None elsewhere: the others cannot be selected)."""
    if isinstance(ensemble, str | Path):
        tok, model, _ = load_ensemble(ensemble)
        ensemble = _Loaded(tok, model)
    prefs = pair_preferences(ensemble, candidates, config.batch_size)
    influence: list[float | None] | None = None
    if config.arm == "uncertainty+influence":
        pool = uncertain_pool(prefs["variance"], config)
        scores = influence_scores(
            ensemble,
            [candidates[i] for i in pool],
            validation_rows,
            p_mean=[prefs["mean"][i] for i in pool],
            **config.influence_kwargs(),
        )
        influence = [None] * len(candidates)
        for i, score in zip(pool, scores, strict=True):
            influence[i] = score
    return {
        "p_members": prefs["members"],
        "p_mean": prefs["mean"],
        "variance": prefs["variance"],
        "influence": influence,
    }


# --- 5 and 6. relabel, refine ---


def refine(
    ensemble_path: str | Path,
    relabeled_rows: Sequence[dict],
    original_rows: Sequence[dict],
    eval_rows: Sequence[dict],
    config: UgdaConfig,
    out_dir: str | Path,
) -> dict:
    """Continue training the saved ensemble on the relabeled pairs plus a replay of
    `replay` x as many original pairs, seeded.

    Why a replay and not all original pairs: a budget of ~100 new pairs would be a
    few percent of the original set and barely move the model; training on the new
    pairs alone forgets the pre-shift distribution. Mixed about one to one, the new
    distribution gets weight and the old one is kept.
    """
    if not relabeled_rows:
        raise ValueError("refine: no relabeled pairs (the labeler labeled none of the selection)")
    rng = random.Random(config.seed)
    k = min(len(original_rows), round(config.replay * len(relabeled_rows)))
    replay = rng.sample(list(original_rows), k) if k else []
    keep = ("prompt", "chosen", "rejected")
    train = [{c: r[c] for c in keep} for r in [*relabeled_rows, *replay]]
    rng.shuffle(train)
    saved = json.loads((Path(ensemble_path) / META_FILE).read_text())
    # read the pairs as the saved ensemble was trained to (older ones: the defaults)
    reading = {k: saved[k] for k in ("prompt_format", "max_length") if k in saved}
    if "over_length" in saved.get("config", {}):
        reading["over_length"] = saved["config"]["over_length"]
    ens_config = EnsembleConfig(
        base_model=str(ensemble_path),
        members=saved["members"],
        **reading,
        epochs=config.refine_epochs,
        learning_rate=config.refine_lr,
        batch_size=config.refine_batch_size,
        seed=config.seed,
    )
    figures = train_ensemble(train, eval_rows, ens_config, out_dir, init_from=ensemble_path)
    return {**figures, "relabeled": len(relabeled_rows), "replayed": len(replay)}


def ugda_round(
    ensemble_path: str | Path,
    candidates: Sequence[dict],
    validation_rows: Sequence[dict],
    labeler: Labeler,
    original_rows: Sequence[dict],
    eval_rows: Sequence[dict],
    config: UgdaConfig,
    out_dir: str | Path,
) -> dict:
    """Score, select, relabel and refine once; the refined ensemble is saved in out_dir.

    Returns the per-candidate scores, the selected ids, the labeled rows and the
    labeler's failures (keep those: ties, unparsed judge answers), and the
    refinement figures (`ensemble`: the path of the model to use next; for arm
    "none", or when nothing could be labeled, the unchanged input ensemble).
    """
    config.check_candidates(len(candidates))
    scores = score_candidates(ensemble_path, candidates, validation_rows, config)
    chosen = select(scores["variance"], scores["influence"], config)
    selected = [candidates[i] for i in chosen]
    labeled, failures = labeler.label(selected) if selected else ([], [])
    result: dict = {
        "arm": config.arm,
        "candidates": len(candidates),
        **scores,
        "selected_ids": [p["id"] for p in selected],
        "labeled": labeled,
        "failures": failures,
        "ensemble": str(ensemble_path),
        "refine": None,
    }
    if labeled:
        result["refine"] = refine(ensemble_path, labeled, original_rows, eval_rows, config, out_dir)
        result["ensemble"] = str(Path(out_dir))
    return result
