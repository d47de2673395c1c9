"""Adapters Selector (COLING 2025) with k-means selector data.

One LoRA adapter per task sits in an `AdapterLibrary`, never merged. A selector picks
the adapter for each input; it is trained only on a few samples per task: those
nearest the centres of a k-means clustering of the task's input embeddings (or, as
the baseline, as many random samples). Two selector kinds:

- `lora`, the paper's: a LoRA adapter on the base model trained to write the adapter's
  name after the input (`<prompt>#<name>`); routing scores every known name's
  log-likelihood and takes the best, so it always names a known adapter;
- `head`: a linear classifier on the mean-pooled input embeddings.

`RoutedGenerator` routes a batch, then runs one batched greedy generate per adapter
and returns the outputs in input order. `AdaptersSelector.add_adapter` and
`remove_adapter` change which adapters exist by updating the selector only: the
other adapters' files are never touched.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, Field, ValidationError

from flywheel.selectors.adapters import (
    AdapterLibrary,
    LoraTraining,
    PromptEmbedder,
    SelectorInputError,
    check_adapter_name,
    fit_lora,
    folder_digest,
    lora_model,
)

Distance = Literal["euclidean", "cosine"]
Selection = Literal["kmeans", "random"]
SelectorKind = Literal["lora", "head"]
SELECTOR_KINDS = ("lora", "head")
NAME_SEP = "#"  # between an input and the adapter name the LoRA selector writes
SELECTOR_ADAPTER = "_selector"  # never a library name: those start with a letter
SELECTOR_FILE = "selector.json"
SAMPLES_FILE = "samples.json"


# --- selector data: k-means or random samples per task ---


def check_tasks(
    task_prompts: Mapping[str, Sequence[str]], k: int, per_centre: int, field: str = "tasks"
) -> None:
    """Every task has a valid name and enough samples for k centres x per_centre each."""
    if not task_prompts:
        raise SelectorInputError(
            f"{field}: the selector would know no adapters; give at least one task's prompts"
        )
    if k < 1 or per_centre < 1:
        raise SelectorInputError(f"k={k}, per_centre={per_centre}: both must be at least 1")
    for name, prompts in task_prompts.items():
        check_adapter_name(name, f"{field}[{name!r}]")
        if not prompts:
            raise SelectorInputError(
                f"{field}[{name!r}]: the task has no samples; give it at least "
                f"k * per_centre = {k * per_centre} prompts or leave it out"
            )
        if k > len(prompts):
            raise SelectorInputError(
                f"k={k} is larger than task {name!r}'s {len(prompts)} samples; "
                f"lower k to at most {len(prompts)} or give the task more samples"
            )
        if k * per_centre > len(prompts):
            raise SelectorInputError(
                f"k * per_centre = {k * per_centre} is more than task {name!r}'s "
                f"{len(prompts)} samples; lower per_centre or k, or give the task more samples"
            )


def kmeans_select(
    embeddings: np.ndarray,
    k: int,
    per_centre: int,
    distance: Distance = "euclidean",
    seed: int = 0,
) -> list[int]:
    """Indices of the `per_centre` samples nearest each of `k` k-means centres.

    Ordered in rounds (each centre's nearest, then each centre's second nearest, ...),
    so any prefix covers every centre: updates replay a prefix of the old samples.
    A centre with too few members leaves its share to the samples nearest their own
    centre, so the count is always k * per_centre. `cosine` clusters unit vectors and
    ranks by 1 - cosine similarity.
    """
    from sklearn.cluster import KMeans

    x = np.asarray(embeddings, dtype=np.float64)
    if distance not in ("euclidean", "cosine"):
        raise SelectorInputError(f"distance: {distance!r} is not 'euclidean' or 'cosine'")
    if not 1 <= k <= len(x) or per_centre < 1 or k * per_centre > len(x):
        raise SelectorInputError(
            f"k={k}, per_centre={per_centre}: need 1 <= k and k * per_centre <= {len(x)} samples"
        )
    if distance == "cosine":
        x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    km = KMeans(n_clusters=k, n_init=4, random_state=seed).fit(x)
    centres = km.cluster_centers_
    if distance == "cosine":
        centres = centres / np.maximum(np.linalg.norm(centres, axis=1, keepdims=True), 1e-12)
        dist = 1.0 - x @ centres.T
    else:
        dist = np.linalg.norm(x[:, None, :] - centres[None, :, :], axis=-1)
    labels = km.labels_
    members = [
        sorted(np.flatnonzero(labels == c).tolist(), key=lambda i, c=c: (dist[i, c], i))
        for c in range(k)
    ]
    picked: list[int] = []
    for rank in range(per_centre):
        picked += [m[rank] for m in members if rank < len(m)]
    if len(picked) < k * per_centre:
        taken = set(picked)
        rest = sorted(
            (i for i in range(len(x)) if i not in taken), key=lambda i: (dist[i, labels[i]], i)
        )
        picked += rest[: k * per_centre - len(picked)]
    return picked


def random_select(n: int, count: int, seed: int = 0) -> list[int]:
    """`count` distinct random indices below n: the baseline at equal samples."""
    return random.Random(seed).sample(range(n), count)


def select_samples(
    task_prompts: Mapping[str, Sequence[str]],
    embed: Callable[[Sequence[str]], np.ndarray],
    *,
    k: int,
    per_centre: int,
    distance: Distance = "euclidean",
    selection: Selection = "kmeans",
    seed: int = 0,
) -> dict[str, list[str]]:
    """The selector's training prompts per task: k * per_centre each, by k-means or random."""
    check_tasks(task_prompts, k, per_centre)
    out: dict[str, list[str]] = {}
    for i, (name, prompts) in enumerate(task_prompts.items()):
        prompts = list(prompts)
        if selection == "kmeans":
            idx = kmeans_select(embed(prompts), k, per_centre, distance, seed + i)
        elif selection == "random":
            idx = random_select(len(prompts), k * per_centre, seed + i)
        else:
            raise SelectorInputError(f"selection: {selection!r} is not 'kmeans' or 'random'")
        out[name] = [prompts[j] for j in idx]
    return out


class SelectorConfig(BaseModel):
    """How the selector's data is chosen and how the selector is trained."""

    kind: SelectorKind = Field("lora", description="'lora' (the paper's) or 'head'")
    selection: Selection = Field("kmeans", description="'kmeans' or 'random' (the baseline)")
    k: int = Field(8, ge=1, description="k-means centres per task")
    per_centre: int = Field(2, ge=1, description="samples kept nearest each centre")
    distance: Distance = "euclidean"
    rank: int = Field(4, ge=1, description="LoRA rank of the selector (kind=lora)")
    steps: int = Field(150, ge=1, description="selector training steps (kind=lora)")
    lr: float = Field(1e-2, gt=0)
    batch_size: int = Field(32, ge=1)
    head_epochs: int = Field(300, ge=1, description="full-batch epochs (kind=head)")
    head_lr: float = Field(0.05, gt=0)
    update_steps: int | None = Field(
        None, ge=1, description="steps (lora) or epochs (head) of an add/remove; null: as fit"
    )
    old_share: float = Field(
        0.3, ge=0, le=1, description="share of each old task's samples replayed on add"
    )
    target_modules: list[str] | None = Field(
        None, description="LoRA target module names (kind=lora); null: found for the model"
    )
    seed: int = 0

    @property
    def samples_per_task(self) -> int:
        return self.k * self.per_centre

    def sampling_kwargs(self, **override: Any) -> dict[str, Any]:
        """These settings as `select_samples` keywords, with any of them overridden."""
        names = {"k", "per_centre", "distance", "selection", "seed"}
        return {**self.model_dump(include=names), **override}

    def lora_training(self) -> LoraTraining:
        """The selector's own LoRA training (kind=lora): the settings it shares with
        `LoraTraining` (alpha is LoraTraining's default)."""
        return LoraTraining(**self.model_dump(include=set(LoraTraining.model_fields)))


def selector_config(**fields: Any) -> SelectorConfig:
    """A SelectorConfig, with an error that names the bad field and what it accepts."""
    try:
        return SelectorConfig(**fields)
    except ValidationError as e:
        err = e.errors()[0]
        field = ".".join(str(p) for p in err["loc"])
        raise SelectorInputError(f"{field}: {err['msg']} (got {err.get('input')!r})") from e


# --- the two selector kinds ---


class Selector:
    """Common state: the adapter names it routes to and the samples it was trained on."""

    kind: str = ""

    def __init__(self, base_model: str | Path, config: SelectorConfig):
        self.base_model = str(base_model)
        self.config = config
        self.names: list[str] = []
        self.samples: dict[str, list[str]] = {}
        self.stats: dict = {}  # the last fit's or update's training figures

    def fit(self, samples: Mapping[str, Sequence[str]], *, update: bool = False) -> dict:
        """Train on {name: prompts}; with update, continue from the current weights."""
        raise NotImplementedError

    def route(self, prompts: Sequence[str]) -> list[str]:
        raise NotImplementedError

    def update(self, train: Mapping[str, Sequence[str]], keep: Mapping[str, Sequence[str]]) -> dict:
        """Continue training on `train`; afterwards the selector knows the names of `keep`
        and remembers its samples (the replay pool of later updates)."""
        stats = self.fit({n: train[n] for n in keep if n in train}, update=True)
        self.names = list(keep)
        self.samples = {n: list(p) for n, p in keep.items()}
        return stats

    def save(self, folder: str | Path, **extra: Any) -> Path:
        """Write selector.json (kind, names, config), samples.json and the weights."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        meta = {
            "kind": self.kind,
            "names": self.names,
            "base_model": self.base_model,
            "config": self.config.model_dump(),
            **extra,
        }
        (folder / SELECTOR_FILE).write_text(json.dumps(meta, indent=2))
        (folder / SAMPLES_FILE).write_text(json.dumps(self.samples, indent=1))
        self._save_weights(folder)
        return folder

    def _save_weights(self, folder: Path) -> None:
        raise NotImplementedError


def _selector_pairs(samples: Mapping[str, Sequence[str]]) -> list[tuple[str, str]]:
    return [(p + NAME_SEP, name) for name, prompts in samples.items() for p in prompts]


@torch.inference_mode()
def name_logprobs(
    model: Any, tok: Any, prompts: Sequence[str], names: Sequence[str], batch: int = 512
) -> np.ndarray:
    """log P(name + EOS | prompt + '#') for every (prompt, name): shape (prompts, names)."""
    pids = [tok(p + NAME_SEP, add_special_tokens=False)["input_ids"] for p in prompts]
    nids = [tok(n, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for n in names]
    pairs = [(i, j) for i in range(len(prompts)) for j in range(len(names))]
    scores = np.zeros((len(prompts), len(names)))
    device = model.device
    for start in range(0, len(pairs), batch):
        chunk = pairs[start : start + batch]
        seqs = [pids[i] + nids[j] for i, j in chunk]
        width = max(len(s) for s in seqs)
        # right padding: a causal forward pass sees each sequence unshifted
        ids = torch.full((len(seqs), width), tok.pad_token_id)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for r, s in enumerate(seqs):
            ids[r, : len(s)] = torch.tensor(s)
            mask[r, : len(s)] = 1
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
        logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
        picked = logp.gather(-1, ids[:, 1:, None].to(device)).squeeze(-1).cpu()
        for r, (i, j) in enumerate(chunk):
            first = len(pids[i])  # position of the name's first token
            scores[i, j] = float(picked[r, first - 1 : first - 1 + len(nids[j])].sum())
    return scores


class LoraSelector(Selector):
    """The paper's selector: a LoRA on the base model that writes the adapter's name."""

    kind = "lora"

    def __init__(self, base_model: str | Path, config: SelectorConfig, adapter: Path | None = None):
        super().__init__(base_model, config)
        self.model, self.tok = lora_model(
            self.base_model, config.lora_training(), init_from=adapter
        )
        self.model.eval()

    def fit(self, samples: Mapping[str, Sequence[str]], *, update: bool = False) -> dict:
        steps = (self.config.update_steps or self.config.steps) if update else self.config.steps
        stats = fit_lora(
            self.model, self.tok, _selector_pairs(samples), self.config.lora_training(), steps=steps
        )
        if not update:
            self.names = list(samples)
            self.samples = {n: list(p) for n, p in samples.items()}
        self.stats = stats
        return stats

    def route(self, prompts: Sequence[str], model: Any = None) -> list[str]:
        """The best-scoring known name per prompt. `model`: a PeftModel whose active
        adapter is this selector's (a generator sharing one base); default its own."""
        if not prompts:
            return []
        scores = name_logprobs(
            model if model is not None else self.model, self.tok, prompts, self.names
        )
        return [self.names[j] for j in scores.argmax(axis=1)]

    def state_dict(self) -> dict[str, torch.Tensor]:
        from peft import get_peft_model_state_dict

        return get_peft_model_state_dict(self.model)

    def _save_weights(self, folder: Path) -> None:
        self.model.save_pretrained(str(folder / "adapter"))


class HeadSelector(Selector):
    """A linear classifier on mean-pooled input embeddings (standardised)."""

    kind = "head"

    def __init__(
        self,
        base_model: str | Path,
        config: SelectorConfig,
        embedder: PromptEmbedder | None = None,
        state: dict[str, torch.Tensor] | None = None,
    ):
        super().__init__(base_model, config)
        self.embedder = embedder or PromptEmbedder(self.base_model)
        self.state = state  # weight (names x dim), bias, mean, std

    def _features(self, prompts: Sequence[str]) -> torch.Tensor:
        assert self.state is not None
        x = torch.from_numpy(self.embedder(prompts))
        return (x - self.state["mean"]) / self.state["std"]

    def fit(self, samples: Mapping[str, Sequence[str]], *, update: bool = False) -> dict:
        started = time.monotonic()
        names = list(samples)
        prompts = [p for n in names for p in samples[n]]
        labels = torch.tensor([j for j, n in enumerate(names) for _ in samples[n]])
        if self.state is None:  # the scale is fixed once, so old rows stay valid on updates
            x = torch.from_numpy(self.embedder(prompts))
            self.state = {"mean": x.mean(0), "std": x.std(0, unbiased=False).clamp(min=1e-6)}
        torch.manual_seed(self.config.seed)
        head = torch.nn.Linear(self.embedder.dim, len(names))
        torch.nn.init.zeros_(head.weight)
        torch.nn.init.zeros_(head.bias)
        if update and "weight" in self.state:
            old = {n: j for j, n in enumerate(self.names)}
            with torch.no_grad():  # warm start: known names keep their rows
                for j, n in enumerate(names):
                    if n in old:
                        head.weight[j] = self.state["weight"][old[n]]
                        head.bias[j] = self.state["bias"][old[n]]
        feats = self._features(prompts)
        # class-balanced: an update replays only a share of each old task's samples
        counts = torch.bincount(labels, minlength=len(names)).clamp(min=1).float()
        weight = counts.sum() / (len(names) * counts)
        opt = torch.optim.Adam(head.parameters(), lr=self.config.head_lr, weight_decay=1e-4)
        epochs = (
            (self.config.update_steps or self.config.head_epochs)
            if update
            else self.config.head_epochs
        )
        loss = torch.tensor(float("nan"))
        for _ in range(epochs):
            loss = torch.nn.functional.cross_entropy(head(feats), labels, weight=weight)
            opt.zero_grad()
            loss.backward()
            opt.step()
        self.state.update(weight=head.weight.detach().clone(), bias=head.bias.detach().clone())
        # the head's rows follow `names`: after an update, keep them in step
        self.names = names
        if not update:
            self.samples = {n: list(p) for n, p in samples.items()}
        self.stats = {"steps": epochs, "loss": loss.item(), "seconds": time.monotonic() - started}
        return self.stats

    def update(self, train: Mapping[str, Sequence[str]], keep: Mapping[str, Sequence[str]]) -> dict:
        # the head needs a row for every kept name, so it trains on all of `keep`'s names
        stats = self.fit({n: train[n] for n in keep}, update=True)
        self.samples = {n: list(p) for n, p in keep.items()}
        return stats

    @torch.inference_mode()
    def route(self, prompts: Sequence[str]) -> list[str]:
        if not prompts:
            return []
        assert self.state is not None
        logits = self._features(prompts) @ self.state["weight"].T + self.state["bias"]
        return [self.names[j] for j in logits.argmax(dim=1).tolist()]

    def _save_weights(self, folder: Path) -> None:
        from safetensors.torch import save_file

        assert self.state is not None
        save_file(
            {k: v.contiguous() for k, v in self.state.items()}, str(folder / "head.safetensors")
        )


def new_selector(
    kind: str,
    base_model: str | Path,
    config: SelectorConfig,
    embedder: PromptEmbedder | None = None,
) -> Selector:
    """An untrained selector of `kind` ('lora' or 'head')."""
    if kind == "lora":
        return LoraSelector(base_model, config)
    if kind == "head":
        return HeadSelector(base_model, config, embedder)
    raise SelectorInputError(f"kind: unknown selector kind {kind!r}; use one of {SELECTOR_KINDS}")


def load_selector(
    folder: str | Path, base_model: str | Path | None = None, embedder: PromptEmbedder | None = None
) -> Selector:
    """A selector saved with `Selector.save`; `base_model` overrides the recorded one."""
    folder = Path(folder)
    if not (folder / SELECTOR_FILE).exists():
        raise SelectorInputError(f"selector: {folder} holds no {SELECTOR_FILE}; save one first")
    meta = json.loads((folder / SELECTOR_FILE).read_text())
    config = SelectorConfig(**meta["config"])
    base = str(base_model or meta["base_model"])
    selector: Selector
    if meta["kind"] == "lora":
        selector = LoraSelector(base, config, adapter=folder / "adapter")
    elif meta["kind"] == "head":
        from safetensors.torch import load_file

        state = load_file(str(folder / "head.safetensors"))
        selector = HeadSelector(base, config, embedder, state=state)
    else:
        raise SelectorInputError(
            f"kind: {folder / SELECTOR_FILE} names kind {meta['kind']!r}; use one of "
            f"{SELECTOR_KINDS}"
        )
    selector.names = list(meta["names"])
    selector.samples = json.loads((folder / SAMPLES_FILE).read_text())
    return selector


# --- inference: route, then one batched generate per adapter ---


@torch.inference_mode()
def generate_greedy(
    model: Any, tok: Any, prompts: Sequence[str], max_new_tokens: int = 16
) -> list[str]:
    """Greedy continuations of `prompts` in ONE batched generate (left padding), cut at EOS."""
    if not prompts:
        return []
    ids = [tok(p, add_special_tokens=False)["input_ids"] or [tok.bos_token_id] for p in prompts]
    batch = tok.pad({"input_ids": ids}, return_tensors="pt")  # the tokenizer pads left
    seqs = model.generate(
        input_ids=batch["input_ids"].to(model.device),
        attention_mask=batch["attention_mask"].to(model.device),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=tok.pad_token_id,
    )
    out = []
    for row in seqs[:, batch["input_ids"].shape[1] :].tolist():
        end = next((j for j, t in enumerate(row) if t == tok.eos_token_id), len(row))
        out.append(tok.decode(row[:end], skip_special_tokens=True))
    return out


class RoutedGenerator:
    """The library's adapters in one PeftModel, routed by the selector.

    A LoRA selector is loaded into the same PeftModel (adapter `_selector`), so one
    base model serves the selector and every task adapter.
    """

    def __init__(self, library: AdapterLibrary, selector: Selector):
        for name in selector.names:
            library.check_known(name, "selector.names")
        self.library = library
        self.selector = selector
        self.model, self.tok = library.load_model(selector.names)
        if isinstance(selector, LoraSelector):
            from peft import set_peft_model_state_dict

            self.model.add_adapter(SELECTOR_ADAPTER, selector.model.peft_config["default"])
            set_peft_model_state_dict(self.model, selector.state_dict(), SELECTOR_ADAPTER)
            self.model.eval()

    def route(self, prompts: Sequence[str]) -> list[str]:
        """The adapter name for each prompt."""
        if isinstance(self.selector, LoraSelector):
            self.model.set_adapter(SELECTOR_ADAPTER)
            return self.selector.route(prompts, model=self.model)
        return self.selector.route(prompts)

    def generate(
        self,
        prompts: Sequence[str],
        *,
        max_new_tokens: int = 16,
        routes: Sequence[str] | None = None,
    ) -> list[str]:
        """Route each prompt (or take `routes`, e.g. the true task for oracle routing),
        then one batched generate per adapter; outputs in input order."""
        routes = list(routes) if routes is not None else self.route(prompts)
        if len(routes) != len(prompts):
            raise SelectorInputError(
                f"routes: {len(routes)} names for {len(prompts)} prompts; give one per prompt"
            )
        groups: dict[str, list[int]] = {}
        for i, name in enumerate(routes):
            groups.setdefault(name, []).append(i)
        out: list[str] = [""] * len(prompts)
        for name, idx in groups.items():
            if name not in self.selector.names:
                raise SelectorInputError(
                    f"routes: {name!r} is not an adapter this generator routes to; "
                    f"known: {self.selector.names}"
                )
            self.model.set_adapter(name)
            texts = generate_greedy(self.model, self.tok, [prompts[i] for i in idx], max_new_tokens)
            for i, text in zip(idx, texts, strict=True):
                out[i] = text
        return out

    def generate_base(self, prompts: Sequence[str], *, max_new_tokens: int = 16) -> list[str]:
        """The base model alone (every adapter off), for comparison."""
        with self.model.disable_adapter():
            return generate_greedy(self.model, self.tok, prompts, max_new_tokens)


# --- the whole method: library + selector, with adapters added and removed ---


class AdaptersSelector:
    """An adapter library and the selector that routes to (some of) its adapters."""

    def __init__(
        self, library: AdapterLibrary, selector: Selector, embedder: PromptEmbedder | None = None
    ):
        self.library = library
        self.selector = selector
        self._embedder = embedder or getattr(selector, "embedder", None)
        self._generator: RoutedGenerator | None = None

    @property
    def names(self) -> list[str]:
        return list(self.selector.names)

    @property
    def config(self) -> SelectorConfig:
        return self.selector.config

    def embedder(self) -> PromptEmbedder:
        if self._embedder is None:
            self._embedder = PromptEmbedder(self.library.base_model)
        return self._embedder

    @classmethod
    def train(
        cls,
        library: AdapterLibrary,
        task_prompts: Mapping[str, Sequence[str]],
        config: SelectorConfig | None = None,
        embedder: PromptEmbedder | None = None,
    ) -> AdaptersSelector:
        """Select each task's samples (k-means, or random as the baseline), then train the
        selector on them. Task names are adapter names in `library`; every input is
        checked before anything is trained."""
        config = config or SelectorConfig()
        check_tasks(task_prompts, config.k, config.per_centre)
        for name in task_prompts:
            library.check_known(name, f"tasks[{name!r}]")
        embedder = embedder or PromptEmbedder(library.base_model)
        samples = select_samples(task_prompts, embedder, **config.sampling_kwargs())
        return cls.from_samples(library, samples, config, embedder)

    @classmethod
    def from_samples(
        cls,
        library: AdapterLibrary,
        samples: Mapping[str, Sequence[str]],
        config: SelectorConfig,
        embedder: PromptEmbedder | None = None,
    ) -> AdaptersSelector:
        """Train a selector of `config.kind` on samples already selected per adapter name
        (so several kinds can share one selection)."""
        if config.kind not in SELECTOR_KINDS:
            raise SelectorInputError(
                f"kind: unknown selector kind {config.kind!r}; use one of {SELECTOR_KINDS}"
            )
        check_tasks(samples, 1, 1, "samples")
        for name in samples:
            library.check_known(name, f"samples[{name!r}]")
        selector = new_selector(config.kind, library.base_model, config, embedder)
        selector.fit(samples)
        return cls(library, selector, embedder)

    def route(self, prompts: Sequence[str]) -> list[str]:
        return self.selector.route(prompts)

    def generator(self) -> RoutedGenerator:
        """A RoutedGenerator over the current adapters (rebuilt after an add or remove)."""
        if self._generator is None:
            self._generator = RoutedGenerator(self.library, self.selector)
        return self._generator

    def add_adapter(
        self, name: str, adapter_path: str | Path, new_task_samples: Sequence[str]
    ) -> dict:
        """Route `name` to the adapter at `adapter_path` by updating the selector only.

        The new task's k-means samples plus `old_share` of every old task's selector
        samples train the selector further; no adapter is trained or changed.
        """
        check_adapter_name(name)
        if name in self.selector.names:
            raise SelectorInputError(
                f"name: the selector already routes to {name!r}; remove it first or pick "
                f"another name (known: {self.names})"
            )
        source = Path(adapter_path)
        if not (source / "adapter_config.json").exists():
            raise SelectorInputError(
                f"adapter_path: {source} is not a saved LoRA adapter (no adapter_config.json); "
                "pass a folder written by PeftModel.save_pretrained"
            )
        if name in self.library.names and folder_digest(source) != self.library.digest(name):
            raise SelectorInputError(
                f"name: the library already holds a different adapter {name!r}; pick another name"
            )
        c = self.config
        check_tasks({name: new_task_samples}, c.k, c.per_centre, "new_task_samples")
        new = select_samples(
            {name: new_task_samples},
            self.embedder(),
            **c.sampling_kwargs(seed=c.seed + len(self.selector.names)),
        )
        if name not in self.library.names:
            self.library.add(name, source)
        replay = {n: s[: math.ceil(c.old_share * len(s))] for n, s in self.selector.samples.items()}
        stats = self.selector.update({**replay, **new}, {**self.selector.samples, **new})
        self._generator = None
        return {"added": name, "selector_samples": len(new[name]), **stats}

    def remove_adapter(self, name: str) -> dict:
        """Stop routing to `name` by updating the selector on the remaining tasks' samples;
        the library and every adapter's files stay as they are."""
        if name not in self.selector.names:
            raise SelectorInputError(
                f"name: the selector routes to no adapter {name!r}; known: {self.names}"
            )
        keep = {n: s for n, s in self.selector.samples.items() if n != name}
        if not keep:
            raise SelectorInputError(
                f"name: removing {name!r} would leave the selector knowing no adapters; "
                "add another adapter first"
            )
        stats = self.selector.update(keep, keep)
        self._generator = None
        return {"removed": name, **stats}

    def save(self, folder: str | Path) -> Path:
        """Save the selector (kind, names, config, samples, weights) with the library's path."""
        folder = Path(folder)
        if folder.exists():
            shutil.rmtree(folder)
        return self.selector.save(folder, library=str(self.library.folder.absolute()))

    @classmethod
    def load(
        cls, folder: str | Path, library: AdapterLibrary | str | Path | None = None
    ) -> AdaptersSelector:
        """A saved selector with its library (the recorded one unless given)."""
        folder = Path(folder)
        if library is None:
            if not (folder / SELECTOR_FILE).exists():
                raise SelectorInputError(f"selector: {folder} holds no {SELECTOR_FILE}")
            library = json.loads((folder / SELECTOR_FILE).read_text())["library"]
        if not isinstance(library, AdapterLibrary):
            library = AdapterLibrary(library)
        selector = load_selector(folder, library.base_model)
        for name in selector.names:
            library.check_known(name, "selector.names")
        return cls(library, selector)


# --- measuring ---


def routing_accuracy(routes: Sequence[str], truth: Sequence[str]) -> dict[str, float]:
    """Share of inputs routed to their own task's adapter, per task and "all"."""
    hits: dict[str, list[float]] = {}
    for got, want in zip(routes, truth, strict=True):
        hits.setdefault(want, []).append(float(got == want))
        hits.setdefault("all", []).append(float(got == want))
    return {name: sum(v) / len(v) for name, v in sorted(hits.items())}


__all__ = [
    "AdaptersSelector",
    "HeadSelector",
    "LoraSelector",
    "RoutedGenerator",
    "Selector",
    "SelectorConfig",
    "check_tasks",
    "generate_greedy",
    "kmeans_select",
    "load_selector",
    "name_logprobs",
    "new_selector",
    "random_select",
    "routing_accuracy",
    "select_samples",
    "selector_config",
]
