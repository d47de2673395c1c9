"""Co-LLM: a base model that learns, token by token, when to defer to a frozen assistant.

"Learning to Decode Collaboratively with Multiple Language Models" (ACL 2024).
A deferral head (Linear(hidden, 1), then a sigmoid) reads the base model's last
hidden state and gives P(defer). Training treats "who writes token t" as a
latent variable and maximises the marginal likelihood of the targets,

    -log[(1 - p_defer) p_base(x_t) + p_defer p_assistant(x_t)],

with the assistant frozen, so its log-probs of the targets are computed once
(`assistant_targets`) and reused every epoch. The head starts from weak
supervision: defer (1) where the assistant's argmax is the target and the
base's is not, else 0. At decode time a token is written by the assistant when
P(defer) > eta, else by the base; both models keep KV caches fed every token.
Pick eta on a validation set with `sweep_eta`, scoring the outputs with a `Scorer`
(exact match by default; ROUGE-L for free text; the flows add a reward model).

Prompts and answers are strings or chat messages, rendered per `prompt_format` (the
one training used is saved with the model and used for decoding); training examples
are fitted to `max_length` tokens, and what is cut or dropped is counted.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from transformers import PreTrainedTokenizerBase

from flywheel.decoders.stepping import (
    CausalLM,
    CausalStepper,
    Decoded,
    check_prompts,
    check_same_vocab,
    chunks,
    decode_text,
    drive,
    prompt_ids,
)
from flywheel.llm.base import Backend, BackendError
from flywheel.llm.chat import (
    Prompt,
    PromptFormat,
    as_text_value,
    render_conversation,
    render_prompt,
    resolve_format,
)
from flywheel.llm.tokens import LengthReport, OverLength, ensure_pad_token, fit_to_length
from flywheel.synthesis.rouge import rouge_l

BASE, ASSISTANT = "base", "assistant"
HEAD_FILE = "deferral_head.pt"
INFO_FILE = "co_llm.json"

Example = tuple[Prompt, Prompt]  # (prompt, answer): strings or chat messages


@dataclass(frozen=True)
class Encoded:
    """One training example as ids: prompt then targets (answer, closed by EOS or the
    chat template's end of turn), within max_length."""

    ids: tuple[int, ...]
    n_prompt: int
    key: str  # keys the assistant's stored log-probs
    prompt: str  # the rendered prompt, for messages


class CoLLM(torch.nn.Module):
    """The base model plus its deferral head; `save`/`load` keep both in one folder."""

    def __init__(
        self,
        base: CausalLM,
        head: torch.nn.Linear | None = None,
        prompt_format: PromptFormat = "auto",
    ) -> None:
        super().__init__()
        self.base = base
        self.lm = base.model  # registered, so .parameters() holds base and head
        self.head = head or torch.nn.Linear(base.model.config.hidden_size, 1)
        self.head.to(base.model.device)
        self.prompt_format = prompt_format  # how prompts were rendered in training

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        return self.base.tokenizer

    def defer_logit(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logit of P(defer) for hidden states (..., hidden) -> (...)."""
        return self.head(hidden.to(self.head.weight.dtype)).squeeze(-1)

    def save(self, folder: str | Path) -> Path:
        """Write the base model (save_pretrained), its tokenizer and the head to `folder`."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.base.model.save_pretrained(folder)
        self.base.tokenizer.save_pretrained(folder)
        torch.save(self.head.state_dict(), folder / HEAD_FILE)
        info = {
            "method": "co-llm",
            "hidden_size": self.head.in_features,
            "prompt_format": self.prompt_format,
        }
        (folder / INFO_FILE).write_text(json.dumps(info))
        return folder

    @classmethod
    def load(cls, folder: str | Path, *, device: str = "cpu") -> CoLLM:
        """Load what `save` wrote."""
        folder = Path(folder)
        if not (folder / HEAD_FILE).is_file():
            raise FileNotFoundError(
                f"{folder} holds no {HEAD_FILE}: it is not a saved Co-LLM model (field: folder). "
                "Pass the folder that CoLLM.save wrote."
            )
        base = CausalLM.load(folder, device=device)
        info = (
            json.loads((folder / INFO_FILE).read_text()) if (folder / INFO_FILE).is_file() else {}
        )
        model = cls(base, prompt_format=info.get("prompt_format", "auto"))
        state = torch.load(folder / HEAD_FILE, map_location=device, weights_only=True)
        model.head.load_state_dict(state)
        return model.eval()


# --- training data: (prompt, answer) pairs, targets = answer tokens + end of answer ---


def example_key(prompt: str, answer: str) -> str:
    """A stable key for one training pair (the assistant's stored log-probs use it)."""
    return hashlib.sha1(f"{prompt}\x00{answer}".encode()).hexdigest()[:16]


def _prompt_ids(tok: PreTrainedTokenizerBase, text: str, fmt: Literal["raw", "chat"]) -> list[int]:
    """A rendered prompt's ids, as decoding encodes it; a chat template holds its special
    tokens already (BOS included)."""
    return (
        tok(text, add_special_tokens=False)["input_ids"] if fmt == "chat" else prompt_ids(tok, text)
    )


def encode_example(
    tok: PreTrainedTokenizerBase,
    prompt: Prompt,
    answer: Prompt,
    fmt: Literal["raw", "chat"],
    report: LengthReport | None = None,
) -> Encoded | None:
    """Prompt ids and targets: the answer + EOS (raw), or the assistant turn as the chat
    template closes it (chat). With `report`, fitted to its max_length and counted; None
    when `drop` leaves the example out."""
    prompt_text, answer_text = render_conversation(tok, prompt, answer, fmt)
    if not prompt_text:
        raise ValueError(
            f"empty prompt in the training examples (answer {answer_text!r}, field: examples)"
        )
    p = _prompt_ids(tok, prompt_text, fmt)
    a = tok(answer_text, add_special_tokens=False)["input_ids"]
    if fmt != "chat":
        a.append(tok.eos_token_id)
    key = example_key(prompt_text, answer_text)
    if report is None:
        return Encoded((*p, *a), len(p), key, prompt_text)
    fitted = fit_to_length(p, a, report)
    if fitted is None:
        return None
    ids, n_prompt = fitted
    if len(ids) < len(p) + len(a):  # a cut example has other targets: its own key
        key = example_key(prompt_text, f"{answer_text}\x00max_length={report.max_length}")
    # a prompt cut away entirely: the answer's first token is the context
    return Encoded(tuple(ids), max(n_prompt, 1), key, prompt_text)


def context_size(lm: CausalLM) -> int | None:
    """The most positions the model takes, from its config (None when it names none)."""
    config = lm.model.config
    for name in ("max_position_embeddings", "n_positions"):
        if isinstance(value := getattr(config, name, None), int):
            return value
    return None


def encode_examples(
    tok: PreTrainedTokenizerBase,
    examples: Sequence[Example],
    *,
    prompt_format: PromptFormat = "auto",
    max_length: int,
    over_length: OverLength = "truncate",
) -> tuple[list[Encoded], LengthReport]:
    """Every example encoded (`encode_example`) within max_length, and the length report."""
    _check_examples(examples)
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
        raise ValueError(
            f"max_length must be an integer >= 2 (field: max_length), got {max_length!r}"
        )
    fmt = resolve_format(prompt_format, tok)
    report = LengthReport(max_length, over_length)
    out = []
    for i, (prompt, answer) in enumerate(examples):
        encoded = encode_example(
            tok,
            as_text_value(prompt, where=f"examples[{i}] prompt"),
            as_text_value(answer, where=f"examples[{i}] answer"),
            fmt,
            report,
        )
        if encoded is not None:
            out.append(encoded)
    if not out:
        raise ValueError(
            f"every one of the {report.texts} examples is longer than max_length={max_length} "
            "tokens and over_length is 'drop' (field: max_length): raise it, or truncate"
        )
    return out, report


def _encoded(tok: PreTrainedTokenizerBase, examples: Sequence[Example | Encoded]) -> list[Encoded]:
    """Examples as ids: encoded ones as they are, pairs rendered per the tokenizer
    (`auto`) without a length limit (so never None)."""
    fmt = resolve_format("auto", tok)
    return [
        e
        if isinstance(e, Encoded)
        else encode_example(
            tok,
            as_text_value(e[0], where=f"examples[{i}] prompt"),
            as_text_value(e[1], where=f"examples[{i}] answer"),
            fmt,
        )
        for i, e in enumerate(examples)
    ]


def _batch(
    tok: PreTrainedTokenizerBase, examples: Sequence[Example | Encoded], device: torch.device
) -> dict:
    """Right-padded ids, and for the shifted logits grid (rows, width - 1) a mask of the
    positions that predict a target token and those targets."""
    ensure_pad_token(tok)  # padding is masked out: any token can stand in
    encoded = [(e.ids, e.n_prompt) for e in _encoded(tok, examples)]
    width = max(len(ids) for ids, _ in encoded)
    ids = torch.full((len(encoded), width), tok.pad_token_id, dtype=torch.long)
    attn = torch.zeros((len(encoded), width), dtype=torch.long)
    target_mask = torch.zeros((len(encoded), width - 1), dtype=torch.bool)
    for i, (seq, n_prompt) in enumerate(encoded):
        ids[i, : len(seq)] = torch.tensor(seq)
        attn[i, : len(seq)] = 1
        # logits at position j predict token j + 1: the targets start at n_prompt
        target_mask[i, n_prompt - 1 : len(seq) - 1] = True
    return {
        "input_ids": ids.to(device),
        "attention_mask": attn.to(device),
        "target_mask": target_mask.to(device),
        "targets": ids[:, 1:].to(device),
    }


def _check_examples(examples: Sequence[Example]) -> None:
    if len(examples) == 0:
        raise ValueError("examples is empty (field: examples): give (prompt, answer) pairs")


# --- the assistant's log-probs of the targets: computed once, stored, reused ---

AssistantTargets = dict[str, dict[str, torch.Tensor]]


@torch.inference_mode()
def assistant_targets(
    assistant: CausalLM,
    examples: Sequence[Example | Encoded],
    *,
    path: str | Path | None = None,
    batch_size: int = 64,
) -> AssistantTargets:
    """The frozen assistant's log-prob of every target token and its argmax there, per
    example key: {"logprob": (T,), "argmax": (T,)} with T = answer tokens + EOS.

    With `path`, rows already stored there for the same assistant are reused and
    only missing ones are computed; the file is rewritten with all of them.
    """
    _check_examples(examples)
    stored: AssistantTargets = {}
    if path is not None and Path(path).is_file():
        saved = torch.load(path, weights_only=True)
        if saved.get("assistant") == assistant.name:
            stored = saved["rows"]
    wanted = {e.key: e for e in _encoded(assistant.tokenizer, examples)}
    missing = [wanted[k] for k in wanted if k not in stored]
    for idx in chunks(len(missing), batch_size):
        batch = _batch(assistant.tokenizer, [missing[i] for i in idx], assistant.model.device)
        logits = assistant.model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
        ).logits[:, :-1]
        logps = torch.log_softmax(logits.float(), dim=-1)
        picked = logps.gather(-1, batch["targets"].unsqueeze(-1)).squeeze(-1)
        argmax = logps.argmax(-1)
        for row, i in enumerate(idx):
            m = batch["target_mask"][row]
            stored[missing[i].key] = {
                "logprob": picked[row][m].cpu().clone(),
                "argmax": argmax[row][m].cpu().clone(),
            }
    if path is not None and missing:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(str(path) + ".tmp")
        torch.save({"assistant": assistant.name, "rows": stored}, tmp)
        tmp.replace(path)
    return {k: stored[k] for k in wanted}


def _gather_stored(
    targets: AssistantTargets, examples: Sequence[Encoded], key: str, mask: torch.Tensor
) -> torch.Tensor:
    """Place the stored per-target values of each example into the (rows, width - 1) grid."""
    if unknown := next((e for e in examples if e.key not in targets), None):
        raise KeyError(
            f"no stored assistant log-probs for prompt {unknown.prompt!r}: compute them with "
            "assistant_targets on the same examples (field: targets)"
        )
    grid = torch.zeros(mask.shape, dtype=targets[examples[0].key][key].dtype)
    for row, e in enumerate(examples):
        values = targets[e.key][key]
        n = int(mask[row].sum())
        if values.shape[0] != n:
            raise ValueError(
                f"stored assistant log-probs for prompt {e.prompt!r} have {values.shape[0]} "
                f"targets, the base tokenizer gives {n}: the models must share a tokenizer"
            )
        grid[row][mask[row].cpu()] = values
    return grid.to(mask.device)


def _base_terms(model: CoLLM, examples: Sequence[Encoded]) -> dict:
    """Base log-probs of the targets, its argmax, and the deferral logits, on the grid."""
    batch = _batch(model.tokenizer, examples, model.lm.device)
    out = model.lm(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        output_hidden_states=True,
    )
    logps = torch.log_softmax(out.logits[:, :-1].float(), dim=-1)
    return {
        **batch,
        "base_logprob": logps.gather(-1, batch["targets"].unsqueeze(-1)).squeeze(-1),
        "base_argmax": logps.argmax(-1),
        "hidden": out.hidden_states[-1][:, :-1],
        "defer_logit": model.defer_logit(out.hidden_states[-1][:, :-1]).float(),
    }


# --- weak supervision, then the marginal likelihood ---


@torch.no_grad()
def weak_labels(
    model: CoLLM, examples: Sequence[Example | Encoded], targets: AssistantTargets
) -> list[list[int]]:
    """Per example, per target token: 1 where the assistant's argmax is the target and
    the base's is not, else 0."""
    _check_examples(examples)
    terms, labels = _weak_label_grid(model, _encoded(model.tokenizer, examples), targets)
    mask = terms["target_mask"]
    return [labels[row][mask[row]].long().tolist() for row in range(len(examples))]


def _weak_label_grid(
    model: CoLLM, examples: Sequence[Encoded], targets: AssistantTargets
) -> tuple[dict, torch.Tensor]:
    terms = _base_terms(model, examples)
    asst_argmax = _gather_stored(targets, examples, "argmax", terms["target_mask"])
    gold = terms["targets"]
    return terms, (asst_argmax == gold) & (terms["base_argmax"] != gold)


def weak_bce(
    model: CoLLM, examples: Sequence[Example | Encoded], targets: AssistantTargets
) -> torch.Tensor:
    """BCE of the deferral head against the weak labels, with the base frozen (no grad)."""
    with torch.no_grad():
        terms, labels = _weak_label_grid(model, _encoded(model.tokenizer, examples), targets)
    mask = terms["target_mask"]
    logit = model.defer_logit(terms["hidden"]).float()
    return F.binary_cross_entropy_with_logits(logit[mask], labels.float()[mask])


def marginal_nll(
    model: CoLLM, examples: Sequence[Example | Encoded], targets: AssistantTargets
) -> torch.Tensor:
    """Mean over target tokens of -log[(1 - p_defer) p_base(x_t) + p_defer p_asst(x_t)]."""
    examples = _encoded(model.tokenizer, examples)
    terms = _base_terms(model, examples)
    mask = terms["target_mask"]
    asst = _gather_stored(targets, examples, "logprob", mask)
    z = terms["defer_logit"]
    mixed = torch.logaddexp(
        F.logsigmoid(-z) + terms["base_logprob"], F.logsigmoid(z) + asst.float()
    )
    return -(mixed[mask]).mean()


@dataclass(frozen=True)
class TrainingPhase:
    """How one training phase runs: AdamW steps, examples drawn per step, learning rate,
    and the seed of both the draws and torch."""

    steps: int = 200
    batch_size: int = 32
    lr: float = 1e-4
    seed: int = 0


def _train_phase(
    model: CoLLM,
    trainable: list[torch.nn.Parameter],
    loss_fn: Callable[[Sequence[Encoded]], torch.Tensor],
    examples: Sequence[Example | Encoded],
    phase: TrainingPhase,
) -> tuple[dict, list[Encoded]]:
    """`phase.steps` AdamW steps of `loss_fn` on batches drawn with replacement, gradients
    clipped to norm 1. Returns the statistics and the encoded examples."""
    _check_examples(examples)
    if phase.steps < 1:
        raise ValueError(f"steps must be >= 1 (field: steps), got {phase.steps}")
    encoded = _encoded(model.tokenizer, examples)
    torch.manual_seed(phase.seed)
    rng = random.Random(phase.seed)
    opt = torch.optim.AdamW(trainable, lr=phase.lr, weight_decay=0.0)
    start = time.monotonic()
    losses = []
    for _ in range(phase.steps):
        batch = [encoded[rng.randrange(len(encoded))] for _ in range(phase.batch_size)]
        loss = loss_fn(batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        losses.append(loss.item())
    model.eval()
    stats = {"steps": phase.steps, "first_loss": losses[0], "loss": losses[-1]}
    return {**stats, "seconds": time.monotonic() - start}, encoded


def init_head_weak(
    model: CoLLM,
    examples: Sequence[Example | Encoded],
    targets: AssistantTargets,
    phase: TrainingPhase = TrainingPhase(lr=1e-2),
) -> dict:
    """Train the head alone (base frozen) with BCE on `weak_labels`' targets.

    Returns {"steps", "first_loss", "loss", "seconds", "positive_share"}.
    """
    model.lm.eval()
    stats, encoded = _train_phase(
        model,
        list(model.head.parameters()),
        lambda batch: weak_bce(model, batch, targets),
        examples,
        phase,
    )
    labels = weak_labels(model, encoded[: min(len(encoded), 256)], targets)
    flat = [x for row in labels for x in row]
    stats["positive_share"] = sum(flat) / len(flat) if flat else 0.0
    return stats


def train_marginal(
    model: CoLLM,
    examples: Sequence[Example | Encoded],
    targets: AssistantTargets,
    phase: TrainingPhase = TrainingPhase(),
) -> dict:
    """Fine-tune base and head together on `marginal_nll`; the assistant stays frozen
    (only its stored log-probs are read). Returns {"steps", "first_loss", "loss", "seconds"}.

    lr 1e-4 by default: on the world, 1e-3 let the base forget the tokens it hands over
    (alone it fell from 0.363 to 0.168 accuracy) and pushed deferral to 95% of tokens.
    """
    model.train()
    stats, _ = _train_phase(
        model,
        list(model.parameters()),
        lambda batch: marginal_nll(model, batch, targets),
        examples,
        phase,
    )
    return stats


class CoLLMTraining(BaseModel):
    """How `train_co_llm` trains, stated once for flows and scripts (`train_kwargs()`)."""

    model_config = ConfigDict(extra="forbid")

    init_steps: int = Field(200, ge=0, description="weak-supervision steps of the head")
    steps: int = Field(300, ge=1, description="marginal-likelihood steps, base and head")
    train_batch_size: int = Field(32, ge=1, description="examples per training step")
    head_lr: float = Field(1e-2, gt=0)
    lr: float = Field(1e-4, gt=0, description="base and head, marginal likelihood")
    prompt_format: PromptFormat = "auto"
    max_length: int | None = Field(
        None, ge=8, description="tokens per training example; null: the base model's context"
    )
    over_length: OverLength = Field(
        "truncate", description="a longer training example: cut or leave out; counted"
    )
    seed: int = 0

    def train_kwargs(self) -> dict:
        """These settings as `train_co_llm` keywords."""
        settings = self.model_dump(include=set(CoLLMTraining.model_fields))
        settings["batch_size"] = settings.pop("train_batch_size")
        return settings


def train_co_llm(
    base: CausalLM,
    assistant: CausalLM,
    examples: Sequence[Example],
    *,
    targets_path: str | Path | None = None,
    init_steps: int = 200,
    steps: int = 300,
    batch_size: int = 32,
    head_lr: float = 1e-2,
    lr: float = 1e-4,
    seed: int = 0,
    prompt_format: PromptFormat = "auto",
    max_length: int | None = None,
    over_length: OverLength = "truncate",
) -> tuple[CoLLM, dict]:
    """The whole recipe: store the assistant's target log-probs, weak-supervision
    initialisation of the head, then marginal-likelihood training.

    Examples are (prompt, answer) strings or chat messages, rendered per `prompt_format`
    and fitted to `max_length` tokens (None: the base model's context size) per
    `over_length`. Returns the model and {"init": ..., "marginal": ..., "length": the
    length report, "prompt_format": the format used} statistics."""
    _check_examples(examples)
    _check_same_tokenizer(base, assistant.tokenizer, assistant.name)
    if max_length is None and (max_length := context_size(base)) is None:
        raise ValueError(
            f"{base.name}'s config names no context size: set max_length (field: max_length)"
        )
    encoded, length = encode_examples(
        base.tokenizer,
        examples,
        prompt_format=prompt_format,
        max_length=max_length,
        over_length=over_length,
    )
    targets = assistant_targets(assistant, encoded, path=targets_path, batch_size=batch_size)
    torch.manual_seed(seed)  # the head's initial weights, so a seed gives one result
    model = CoLLM(base, prompt_format=resolve_format(prompt_format, base.tokenizer))
    head_phase = TrainingPhase(init_steps, batch_size, head_lr, seed)
    # init_steps 0: no weak-supervision start, the head keeps its seeded initial weights
    init = init_head_weak(model, encoded, targets, head_phase) if init_steps else {"steps": 0}
    marginal = train_marginal(model, encoded, targets, TrainingPhase(steps, batch_size, lr, seed))
    stats = {"init": init, "marginal": marginal, "length": length.as_dict()}
    return model, {**stats, "prompt_format": model.prompt_format}


def _check_same_tokenizer(base: CausalLM, tok: PreTrainedTokenizerBase, name: str) -> None:
    """Both tokenizers padded alike (a stand-in where one has no pad token: padding is
    masked out), then the same vocabulary."""
    ensure_pad_token(base.tokenizer)
    ensure_pad_token(tok)
    check_same_vocab(base.tokenizer, tok, base.name, name)


# --- decoding ---


def check_eta(eta: float) -> None:
    """Raise ValueError unless 0 <= eta <= 1."""
    if isinstance(eta, bool) or not isinstance(eta, int | float) or not 0 <= eta <= 1:
        raise ValueError(
            f"eta must be a number in [0, 1] (field: eta), got {eta!r}: a token is deferred "
            "when P(defer) > eta, so 0 defers every token and 1 defers none"
        )


def _backend_token_id(tokenizer: PreTrainedTokenizerBase, text: str) -> int:
    """The id of a token a backend returned as text (an empty text or EOS string -> EOS)."""
    if text == "" or text == tokenizer.eos_token:
        return tokenizer.eos_token_id
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return ids[0] if ids else tokenizer.eos_token_id


@torch.inference_mode()
def co_llm_decode(
    model: CoLLM,
    assistant: CausalLM | Backend,
    prompts: Sequence[Prompt],
    *,
    eta: float,
    max_new_tokens: int = 16,
    batch_size: int = 64,
) -> Decoded:
    """Greedy Co-LLM decoding: each token is the assistant's when P(defer) > eta, else the
    base's. `writers` holds "base"/"assistant" per token; `share("assistant")` is the
    share deferred. Prompts (strings or chat messages) are rendered as in training
    (`model.prompt_format`).

    The assistant is either an in-process `CausalLM` (its own KV cache is fed every
    chosen token) or any `Backend`, e.g. an OpenAI-compatible server: then only the
    rows that defer ask it, with `next_token_topk(prefix, k=1)` on the text so far. A
    server re-reads the prefix on every call; prefix caching (vLLM's default) makes that
    cheap. A backend must use the base's tokenizer; its token text is mapped back to an
    id with that tokenizer.
    """
    check_eta(eta)
    check_prompts(prompts)
    if isinstance(assistant, CausalLM):
        _check_same_tokenizer(model.base, assistant.tokenizer, assistant.name)
    elif isinstance(assistant, Backend):
        if (tok := getattr(assistant, "tokenizer", None)) is not None:
            _check_same_tokenizer(model.base, tok, assistant.model)
    else:
        raise TypeError(
            f"assistant must be a CausalLM or a Backend (field: assistant), got "
            f"{type(assistant).__name__}"
        )
    model.eval()
    tok = model.tokenizer
    fmt = resolve_format(model.prompt_format, tok)
    texts = [
        render_prompt(tok, as_text_value(p, where=f"prompts[{i}]"), fmt)
        for i, p in enumerate(prompts)
    ]
    ids: list[list[int]] = []
    writers: list[list[int]] = []
    for idx in chunks(len(prompts), batch_size):
        batch_prompts = [texts[i] for i in idx]
        encoded = [_prompt_ids(tok, p, fmt) for p in batch_prompts]
        base = CausalStepper(model.base, encoded, want_hidden=True)
        steppers = [base]
        helper = None
        if isinstance(assistant, CausalLM):
            helper = CausalStepper(assistant, encoded)
            steppers.append(helper)

        def choose(
            written: list[list[int]],
            base: CausalStepper = base,
            helper: CausalStepper | None = helper,
            batch_prompts: list[str] = batch_prompts,
        ) -> tuple[torch.Tensor, torch.Tensor]:
            p_defer = torch.sigmoid(model.defer_logit(base.hidden).double())
            defer = (p_defer > eta) & ~base.finished
            chosen = base.logits.argmax(-1)
            if not bool(defer.any()):
                pass  # the assistant's stepper is not read, so it does not run this step
            elif helper is not None:
                chosen = torch.where(defer, helper.logits.argmax(-1), chosen)
            else:
                rows = defer.nonzero().view(-1).tolist()
                prefixes = [batch_prompts[r] + tok.decode(written[r]) for r in rows]
                answers = assistant.next_token_topk(prefixes, k=1)
                for r, top in zip(rows, answers, strict=True):
                    if not top:
                        raise BackendError(
                            f"assistant {assistant.model!r} returned no next token for "
                            f"prefix {batch_prompts[r]!r}"
                        )
                    chosen[r] = _backend_token_id(tok, top[0].token)
            return chosen, defer.long()

        batch_ids, batch_writers = drive(steppers, choose, max_new_tokens)
        ids += batch_ids
        writers += batch_writers
    names = (BASE, ASSISTANT)
    return Decoded(
        texts=[decode_text(model.base, row) for row in ids],
        token_ids=ids,
        writers=[[names[w] for w in row] for row in writers],
    )


# --- choosing eta: a scorer of the validation outputs ---


class Scorer(Protocol):
    """Scores decoded outputs, one number per prompt (higher is better): given the
    prompts, the completions and the reference answers (None where a row has none)."""

    def __call__(
        self,
        prompts: Sequence[Prompt],
        completions: Sequence[str],
        answers: Sequence[str | None],
    ) -> list[float]: ...


def _references(answers: Sequence[str | None], scorer: str) -> list[str]:
    missing = [i for i, a in enumerate(answers) if not isinstance(a, str)]
    if missing:
        raise ValueError(
            f"answers[{missing[0]}] is missing ({len(missing)} row(s) without an answer): the "
            f"{scorer} scorer needs a reference answer per prompt (field: answers); give "
            "answers or a scorer that needs none (a reward model)"
        )
    return list(answers)  # type: ignore[arg-type]


def exact_match(
    prompts: Sequence[Prompt], completions: Sequence[str], answers: Sequence[str | None]
) -> list[float]:
    """1.0 where the completion is the answer (surrounding whitespace aside), else 0.0."""
    refs = _references(answers, "exact_match")
    return [float(c.strip() == a.strip()) for c, a in zip(completions, refs, strict=True)]


def rouge_l_f(
    prompts: Sequence[Prompt], completions: Sequence[str], answers: Sequence[str | None]
) -> list[float]:
    """ROUGE-L F1 between completion and answer (lower-cased words): partial credit for
    free text, where exact match scores every eta 0."""
    refs = _references(answers, "rouge_l")
    return [rouge_l(c, a) for c, a in zip(completions, refs, strict=True)]


SCORERS: dict[str, Scorer] = {"exact_match": exact_match, "rouge_l": rouge_l_f}


def sweep_eta(
    model: CoLLM,
    assistant: CausalLM | Backend,
    prompts: Sequence[Prompt],
    answers: Sequence[str | None] | None = None,
    *,
    scorer: Scorer = exact_match,
    etas: Sequence[float] = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0),
    max_new_tokens: int = 16,
    batch_size: int = 64,
) -> dict:
    """Decode a validation set at every eta and score the outputs with `scorer` against
    `answers` (one per prompt; None for a scorer that needs none).

    Returns {"results": [{"eta", "score", "deferral_share"}, ...], "recommended_eta",
    "scorer"}: the best mean score, ties broken by fewer deferrals.
    """
    if len(etas) == 0:
        raise ValueError("etas is empty (field: etas): give at least one eta in [0, 1]")
    for eta in etas:
        check_eta(eta)
    check_prompts(prompts)
    answers = [None] * len(prompts) if answers is None else list(answers)
    if len(answers) != len(prompts):
        raise ValueError(
            f"{len(answers)} answers for {len(prompts)} prompts (field: answers): give one "
            "answer per prompt"
        )
    results = []
    for eta in etas:
        out = co_llm_decode(
            model,
            assistant,
            prompts,
            eta=eta,
            max_new_tokens=max_new_tokens,
            batch_size=batch_size,
        )
        scores = [float(x) for x in scorer(prompts, out.texts, answers)]
        if len(scores) != len(prompts):
            raise ValueError(
                f"scorer gave {len(scores)} scores for {len(prompts)} outputs (field: scorer): "
                "it must give one number per output"
            )
        results.append(
            {
                "eta": float(eta),
                "score": sum(scores) / len(scores),
                "deferral_share": out.share(ASSISTANT),
            }
        )
    if any(math.isnan(r["score"]) for r in results):
        raise ValueError("scorer returned NaN (field: scorer): it must give a number per output")
    best = min(results, key=lambda r: (-r["score"], r["deferral_share"], -r["eta"]))
    name = next((k for k, v in SCORERS.items() if v is scorer), None)
    name = name or getattr(scorer, "__name__", type(scorer).__name__)
    return {"results": results, "recommended_eta": best["eta"], "scorer": name}
