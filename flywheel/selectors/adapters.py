"""A library of LoRA adapters on one base model: one adapter per task, never merged.

Each adapter is trained with peft on its own task's (prompt, answer) pairs and saved
with `save_pretrained` into `<library>/<name>/`; `library.json` names the base model
and lists the adapters with how they were trained. `AdapterLibrary.load_model()` puts
every adapter into one `PeftModel` under its own name, so switching task is
`model.set_adapter(name)` and the base weights are held once.

LoRA goes on the linear projections of the model's repeated blocks, found for the
architecture (q/k/v/o and the MLP's projections for Llama or Qwen2; GPT-2's `c_attn`,
`c_proj` and `c_fc` Conv1D layers), or on the modules `target_modules` names.

Inputs are embedded by mean-pooling the base model's input embedding layer over the
prompt's tokens: no sentence-embedding model is installed here, and the base's own
embeddings need nothing beyond the model every adapter already sits on.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, Field

from flywheel.llm.tokens import ensure_pad_token
from flywheel.names import SHORT_NAME_RULE, is_short_name

LIBRARY_FILE = "library.json"


class SelectorInputError(ValueError):
    """Bad input to the adapter selector, found before anything is trained."""


def check_adapter_name(name: str, field: str = "name") -> str:
    """`name` if it can name an adapter (it becomes a folder and a peft adapter name)."""
    if is_short_name(name):
        return name
    raise SelectorInputError(f"{field}: invalid adapter name {name!r}; use {SHORT_NAME_RULE}")


class LoraTraining(BaseModel):
    """How one LoRA adapter is trained (the short loop of `flywheel.llm.training`)."""

    rank: int = Field(8, ge=1, description="LoRA rank r")
    alpha: float | None = Field(None, gt=0, description="LoRA alpha; null: 2 * rank")
    steps: int = Field(300, ge=1)
    lr: float = Field(1e-2, gt=0)
    batch_size: int = Field(32, ge=1)
    seed: int = 0
    target_modules: list[str] | None = Field(
        None,
        min_length=1,
        description="names of the modules LoRA adapts (e.g. ['q_proj', 'v_proj']); null: "
        "the linear projections of the model's blocks",
    )


def load_base(base_model: str | Path) -> tuple[Any, Any]:
    """The base causal LM and its tokenizer from a local folder (never downloads)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = Path(base_model).expanduser()
    if not (folder / "config.json").exists():
        raise SelectorInputError(
            f"base_model: no model folder at {folder} (no config.json); pass the folder of a "
            "saved causal LM (save_pretrained)"
        )
    tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    tok.padding_side = "left"  # generation: every prompt ends at the last position
    ensure_pad_token(tok)
    model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True)
    return model.eval(), tok


def _adaptable(model: Any) -> dict[str, torch.nn.Module]:
    """Leaf modules LoRA can adapt (Linear, and the Conv1D GPT-2 uses), by full name."""
    from transformers.pytorch_utils import Conv1D

    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear | Conv1D)
    }


def find_target_modules(model: Any) -> list[str]:
    """The names (last part) of the linear projections inside the model's repeated
    blocks, attention and MLP: what LoRA adapts when `target_modules` is not given.

    Blocks are the items of a ModuleList (`model.layers`, GPT-2's `transformer.h`), so
    the LM head and embeddings are never picked. When no block holds one, peft's own
    mapping for the model type is used; nothing found is an error naming the field.
    """
    from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as PEFT_TARGETS

    in_blocks = {
        f"{list_name}.{name}"
        for list_name, module in model.named_modules()
        if isinstance(module, torch.nn.ModuleList)
        for name, _ in module.named_modules()
        if name
    }
    found: list[str] = []
    for name in _adaptable(model):
        short = name.rsplit(".", 1)[-1]
        if name in in_blocks and short not in found:
            found.append(short)
    if not found:
        found = list(PEFT_TARGETS.get(getattr(model.config, "model_type", None), []))
    if not found:
        raise SelectorInputError(
            f"target_modules: found no linear projections to adapt in "
            f"{type(model).__name__}; name them in `target_modules` (modules present: "
            f"{sorted({n.rsplit('.', 1)[-1] for n in _adaptable(model)})})"
        )
    return found


def check_target_modules(model: Any, target_modules: Sequence[str]) -> list[str]:
    """`target_modules` if each names at least one adaptable module (a full name or its
    last parts, as peft matches them)."""
    names = list(_adaptable(model))
    unknown = [t for t in target_modules if not any(n == t or n.endswith(f".{t}") for n in names)]
    if unknown:
        raise SelectorInputError(
            f"target_modules: {unknown} name no Linear or Conv1D module of "
            f"{type(model).__name__}; modules it has: "
            f"{sorted({n.rsplit('.', 1)[-1] for n in names})}"
        )
    return list(target_modules)


def lora_config(training: LoraTraining, model: Any) -> Any:
    """peft's LoraConfig for `training` on `model`: the given target modules (checked),
    or those `find_target_modules` finds."""
    from peft import LoraConfig
    from transformers.pytorch_utils import Conv1D

    if training.target_modules is None:
        targets = find_target_modules(model)
    else:
        targets = check_target_modules(model, training.target_modules)
    adapted = [
        m
        for n, m in _adaptable(model).items()
        if any(n == t or n.endswith(f".{t}") for t in targets)
    ]
    return LoraConfig(
        r=training.rank,
        lora_alpha=training.alpha or 2 * training.rank,
        target_modules=targets,
        lora_dropout=0.0,
        # Conv1D stores its weight transposed (GPT-2)
        fan_in_fan_out=any(isinstance(m, Conv1D) for m in adapted),
        task_type="CAUSAL_LM",
    )


def lora_model(
    base_model: str | Path, training: LoraTraining, *, init_from: str | Path | None = None
) -> tuple[Any, Any]:
    """A trainable PeftModel on the base (a fresh LoRA, or one continued from a saved
    adapter folder) and the tokenizer."""
    from peft import PeftModel, get_peft_model

    model, tok = load_base(base_model)
    torch.manual_seed(training.seed)  # the LoRA init is random too
    if init_from is not None:
        return PeftModel.from_pretrained(model, str(init_from), is_trainable=True), tok
    return get_peft_model(model, lora_config(training, model)), tok


def fit_lora(
    peft_model: Any,
    tok: Any,
    examples: Sequence[tuple[str, str]],
    training: LoraTraining,
    *,
    steps: int | None = None,
    progress: Callable[[int, float], None] | None = None,
) -> dict:
    """Train the active LoRA of `peft_model` on (prompt, answer) pairs (loss on the answer
    and EOS only); the base weights stay frozen. Returns {"steps", "loss", "seconds"}."""
    from flywheel.llm.training import train_causal_lm

    if not examples:
        raise SelectorInputError("examples: no (prompt, answer) pairs to train the adapter on")
    return train_causal_lm(
        peft_model,
        tok,
        list(examples),
        steps=steps or training.steps,
        batch_size=training.batch_size,
        lr=training.lr,
        seed=training.seed,
        progress=progress,
    )


def train_lora(
    base_model: str | Path,
    examples: Sequence[tuple[str, str]],
    out_dir: str | Path,
    training: LoraTraining,
    *,
    progress: Callable[[int, float], None] | None = None,
) -> dict:
    """Train one LoRA adapter on (prompt, answer) pairs and save it into `out_dir`
    (`save_pretrained`). Returns the loop's {"steps", "loss", "seconds"} and the
    `target_modules` adapted."""
    if not examples:
        raise SelectorInputError("examples: no (prompt, answer) pairs to train the adapter on")
    peft_model, tok = lora_model(base_model, training)
    stats = fit_lora(peft_model, tok, examples, training, progress=progress)
    peft_model.save_pretrained(str(out_dir))
    targets = peft_model.peft_config[peft_model.active_adapter].target_modules
    return {**stats, "target_modules": sorted(targets)}


class PromptEmbedder:
    """Mean-pooled input embeddings of a base model: the features for k-means and the head.

    Only the embedding matrix is kept, so embedding costs a lookup, not a forward pass.
    """

    def __init__(self, base_model: str | Path | None = None, *, model: Any = None, tok: Any = None):
        if model is None:
            model, tok = load_base(base_model)  # type: ignore[arg-type]
        self.tok = tok
        self.weight = model.get_input_embeddings().weight.detach().clone()

    @property
    def dim(self) -> int:
        return int(self.weight.shape[1])

    def __call__(self, prompts: Sequence[str]) -> np.ndarray:
        out = np.zeros((len(prompts), self.dim), dtype=np.float32)
        for i, prompt in enumerate(prompts):
            ids = self.tok(prompt, add_special_tokens=False)["input_ids"]
            if ids:
                out[i] = self.weight[ids].mean(0).numpy()
        return out


def folder_digest(folder: str | Path) -> str:
    """sha256 over a folder's file names and bytes: equal digests, byte-identical files."""
    h = hashlib.sha256()
    root = Path(folder)
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        h.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes())
    return h.hexdigest()


def _copy_into_place(source: Path, target: Path) -> None:
    # a temporary copy renamed into place: a crash never leaves half an adapter
    tmp = target.with_name(f".tmp-{uuid.uuid4().hex}")
    shutil.copytree(source, tmp)
    os.rename(tmp, target)


class AdapterLibrary:
    """A folder of LoRA adapters on one base model, each in `<folder>/<name>/`."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        index = self.folder / LIBRARY_FILE
        if not index.exists():
            raise SelectorInputError(
                f"library: {self.folder} holds no {LIBRARY_FILE}; create one with "
                "AdapterLibrary.create(folder, base_model)"
            )
        self._index = json.loads(index.read_text())

    @classmethod
    def create(cls, folder: str | Path, base_model: str | Path) -> AdapterLibrary:
        """An empty library for adapters on `base_model`."""
        folder = Path(folder)
        base = Path(base_model).expanduser()
        if not (base / "config.json").exists():
            raise SelectorInputError(
                f"base_model: no model folder at {base}; pass a local model folder"
            )
        folder.mkdir(parents=True, exist_ok=True)
        index = {"base_model": str(base.absolute()), "adapters": {}}
        (folder / LIBRARY_FILE).write_text(json.dumps(index, indent=2))
        return cls(folder)

    @property
    def base_model(self) -> str:
        return self._index["base_model"]

    @property
    def names(self) -> list[str]:
        return list(self._index["adapters"])

    def info(self, name: str) -> dict:
        """What `library.json` records about an adapter (training settings, figures)."""
        return self._index["adapters"][self.check_known(name)]

    def path(self, name: str) -> Path:
        return self.folder / self.check_known(name)

    def check_known(self, name: str, field: str = "name") -> str:
        if name not in self._index["adapters"]:
            raise SelectorInputError(
                f"{field}: no adapter {name!r} in the library at {self.folder}; "
                f"known adapters: {self.names or 'none'}"
            )
        return name

    def _save_index(self) -> None:
        tmp = self.folder / f".{LIBRARY_FILE}.tmp"
        tmp.write_text(json.dumps(self._index, indent=2, default=str))
        os.replace(tmp, self.folder / LIBRARY_FILE)

    def train(
        self,
        name: str,
        examples: Sequence[tuple[str, str]],
        training: LoraTraining,
        info: dict | None = None,
    ) -> dict:
        """Train a new adapter for one task into the library; its training figures."""
        check_adapter_name(name)
        if name in self._index["adapters"]:
            raise SelectorInputError(f"name: adapter {name!r} is already in the library")
        tmp = self.folder / f".tmp-{uuid.uuid4().hex}"
        try:
            stats = train_lora(self.base_model, examples, tmp, training)
            os.rename(tmp, self.folder / name)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        entry = {"training": training.model_dump(), "train": stats, **(info or {})}
        self._index["adapters"][name] = entry
        self._save_index()
        return entry

    def add(self, name: str, adapter_path: str | Path, info: dict | None = None) -> None:
        """Copy a saved LoRA adapter (a peft `save_pretrained` folder) into the library."""
        check_adapter_name(name)
        source = Path(adapter_path)
        if not (source / "adapter_config.json").exists():
            raise SelectorInputError(
                f"adapter_path: {source} is not a saved LoRA adapter (no adapter_config.json); "
                "pass a folder written by PeftModel.save_pretrained"
            )
        if name in self._index["adapters"]:
            raise SelectorInputError(f"name: adapter {name!r} is already in the library")
        _copy_into_place(source, self.folder / name)
        self._index["adapters"][name] = dict(info or {})
        self._save_index()

    def copy_to(self, folder: str | Path, names: Sequence[str] | None = None) -> AdapterLibrary:
        """A new library holding byte-identical copies of `names` (default: all)."""
        names = self.names if names is None else [self.check_known(n) for n in names]
        target = AdapterLibrary.create(folder, self.base_model)
        for name in names:
            _copy_into_place(self.path(name), target.folder / name)
            target._index["adapters"][name] = self._index["adapters"][name]
        target._save_index()
        return target

    def digest(self, name: str) -> str:
        return folder_digest(self.path(name))

    def load_model(self, names: Sequence[str] | None = None) -> tuple[Any, Any]:
        """One PeftModel on the base with every adapter in `names` (default: all) loaded
        under its own name, and the tokenizer."""
        from peft import PeftModel

        names = self.names if names is None else [self.check_known(n) for n in names]
        if not names:
            raise SelectorInputError(f"library: {self.folder} holds no adapters to load")
        base, tok = load_base(self.base_model)
        model = PeftModel.from_pretrained(base, str(self.path(names[0])), adapter_name=names[0])
        for name in names[1:]:
            model.load_adapter(str(self.path(name)), adapter_name=name)
        return model.eval(), tok
