"""Token-by-token decoding of a left-padded batch with a KV cache, shared by the decoders.

Co-LLM and hybrid gating both let two models take turns writing one text. Each
model keeps its own `CausalStepper`: the prompts are encoded once, and every
chosen token (whoever wrote it) is appended to both caches, so no prefix is
ever re-encoded. Appending is lazy: a model runs only when its next-token
logits are read, then on all the tokens it has not seen in one forward. The
models must share a tokenizer so one token id means the same thing to both
(`check_same_vocab`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)


@dataclass
class CausalLM:
    """A causal LM, its tokenizer and a name for error messages."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    name: str

    @classmethod
    def load(cls, path: str | Path, *, device: str = "cpu") -> CausalLM:
        """Load a saved model folder (never downloads) in eval mode."""
        tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True)
        return cls(model.to(device).eval(), tok, str(path))

    @property
    def eos_ids(self) -> set[int]:
        return eos_ids(self.model, self.tokenizer)


def eos_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> set[int]:
    """Every token id that ends a text: the generation config's and the tokenizer's EOS."""
    ids = model.generation_config.eos_token_id
    found = set() if ids is None else {ids} if isinstance(ids, int) else set(ids)
    if tokenizer.eos_token_id is not None:
        found.add(tokenizer.eos_token_id)
    return found


def check_same_vocab(
    tok_a: PreTrainedTokenizerBase,
    tok_b: PreTrainedTokenizerBase,
    name_a: str = "model A",
    name_b: str = "model B",
) -> None:
    """Raise ValueError unless both tokenizers map the same strings to the same ids.

    Token-level collaboration writes one model's token id into the other's
    cache; with different vocabularies that id would mean another token.
    """
    problems = []
    if tok_a.get_vocab() != tok_b.get_vocab():
        problems.append("their vocabularies differ")
    # not the pad token: each model pads its own rows and masks them out (a tokenizer
    # class may add a pad token, e.g. Qwen2's, that another loading of it lacks)
    for attr in ("eos_token_id", "bos_token_id"):
        if getattr(tok_a, attr) != getattr(tok_b, attr):
            problems.append(f"{attr} {getattr(tok_a, attr)} != {getattr(tok_b, attr)}")
    if problems:
        raise ValueError(
            f"{name_a} and {name_b} do not share a tokenizer ({'; '.join(problems)}). "
            "Token-level collaboration needs one vocabulary: pair models trained with the "
            "same tokenizer (e.g. world-small with world-large)."
        )


def prompt_ids(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    """Token ids of a prompt, as TransformersBackend encodes it (BOS for an empty prompt)."""
    ids = tokenizer(text)["input_ids"]
    if not ids:
        if tokenizer.bos_token_id is None:
            raise ValueError("empty prompt and the tokenizer has no BOS token")
        ids = [tokenizer.bos_token_id]
    return ids


class CausalStepper:
    """One model, one left-padded batch, one KV cache: next-token logits for every row,
    and `append` to feed one chosen token per row.

    Lazy: `append` only queues the token; the model runs when `logits` or `hidden`
    is read, on every queued token in one forward. A helper model that is asked
    for a token only now and then (Co-LLM's assistant, hybrid gating's large
    model) thus costs nothing on the steps it is not asked, and catches up on the
    skipped tokens in one call when it is, without re-reading the prefix.

    Positions count real tokens only, so a padded row sees the same positions as
    it would alone. Finished rows (see `finished`) are fed the pad token with
    attention mask 0, so they never change what the other rows see.
    """

    def __init__(
        self,
        lm: CausalLM,
        prompts_ids: Sequence[Sequence[int]],
        *,
        want_hidden: bool = False,
    ) -> None:
        if not prompts_ids:
            raise ValueError("prompts is empty (field: prompts): give at least one prompt")
        self.lm = lm
        self.want_hidden = want_hidden
        tok = lm.tokenizer
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        self.device = lm.model.device
        width = max(len(p) for p in prompts_ids)
        n = len(prompts_ids)
        ids = torch.full((n, width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((n, width), dtype=torch.long)
        for i, p in enumerate(prompts_ids):
            if len(p):
                ids[i, width - len(p) :] = torch.tensor(list(p), dtype=torch.long)
                mask[i, width - len(p) :] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        self.attention_mask = mask.to(self.device)
        self.finished = torch.zeros(n, dtype=torch.bool, device=self.device)
        self._eos = torch.tensor(sorted(lm.eos_ids), dtype=torch.long, device=self.device)
        self._next_position = positions[:, -1:].to(self.device) + 1
        self.past_key_values = None
        self.forwards = 0  # model calls so far, for cost accounting
        # queued (token ids, position ids) blocks, each (rows, length); the prompt first
        self._pending: list[tuple[torch.Tensor, torch.Tensor]] = [
            (ids.to(self.device), positions.to(self.device))
        ]

    @torch.inference_mode()
    def _flush(self) -> None:
        """Run the model on every queued token; the mask already covers them."""
        if not self._pending:
            return
        input_ids = torch.cat([ids for ids, _ in self._pending], dim=-1)
        position_ids = torch.cat([pos for _, pos in self._pending], dim=-1)
        self._pending = []
        out = self.lm.model(
            input_ids=input_ids,
            attention_mask=self.attention_mask,
            position_ids=position_ids,
            past_key_values=self.past_key_values,
            use_cache=True,
            output_hidden_states=self.want_hidden,
        )
        self.forwards += 1
        self.past_key_values = out.past_key_values
        # next-token logits (rows, vocab); the last layer's hidden state (rows, hidden)
        self._logits = out.logits[:, -1].float()
        self._hidden = out.hidden_states[-1][:, -1] if self.want_hidden else None

    @property
    def logits(self) -> torch.Tensor:
        """Next-token logits of every row, (rows, vocab), float32."""
        self._flush()
        return self._logits

    @property
    def hidden(self) -> torch.Tensor | None:
        """The last layer's hidden state at the last position (rows, hidden), or None
        unless made with `want_hidden=True`."""
        self._flush()
        return self._hidden

    @property
    def cache_length(self) -> int:
        """Positions held in the KV cache (prompt width plus appended tokens)."""
        self._flush()
        return int(self.past_key_values.get_seq_length())

    def append(self, token_ids: torch.Tensor) -> None:
        """Queue one token per row; rows already finished get the pad token, masked out.

        A row whose token is an EOS id is marked finished after this call.
        """
        token_ids = token_ids.to(self.device).long().view(-1)
        if token_ids.shape[0] != self.finished.shape[0]:
            raise ValueError(
                f"append needs one token per row: got {token_ids.shape[0]} for "
                f"{self.finished.shape[0]} rows"
            )
        token_ids = torch.where(self.finished, self.pad_id, token_ids)
        new_mask = (~self.finished).long().unsqueeze(-1)
        self.attention_mask = torch.cat([self.attention_mask, new_mask], dim=-1)
        positions = self._next_position
        self._next_position = positions + 1
        self.finished = self.finished | torch.isin(token_ids, self._eos)
        self._pending.append((token_ids.unsqueeze(-1), positions))


# A chooser sees the tokens written so far in every row and returns, for every row,
# the token to write next and the index of the model that wrote it.
Chooser = Callable[[list[list[int]]], tuple[torch.Tensor, torch.Tensor]]


def drive(
    steppers: Sequence[CausalStepper], choose: Chooser, max_new_tokens: int
) -> tuple[list[list[int]], list[list[int]]]:
    """Run `choose` for up to `max_new_tokens` steps and feed its tokens to every stepper.

    Returns per row the written token ids (up to and including an EOS) and the
    index of the writer of each. Stops early once every row has finished.
    """
    if max_new_tokens < 0:
        raise ValueError(
            f"max_new_tokens must be >= 0 (field: max_new_tokens), got {max_new_tokens}"
        )
    lead = steppers[0]
    n = lead.finished.shape[0]
    tokens: list[list[int]] = [[] for _ in range(n)]
    writers: list[list[int]] = [[] for _ in range(n)]
    for _ in range(max_new_tokens):
        if bool(lead.finished.all()):
            break
        was_finished = lead.finished.tolist()
        chosen, who = choose(tokens)
        for stepper in steppers:
            stepper.append(chosen)
        for i, (t, w) in enumerate(zip(chosen.tolist(), who.tolist(), strict=True)):
            if not was_finished[i]:
                tokens[i].append(t)
                writers[i].append(w)
    return tokens, writers


@dataclass
class Decoded:
    """What a collaborative decoder wrote: texts, token ids and who wrote each token."""

    texts: list[str]
    token_ids: list[list[int]]
    writers: list[list[str]]

    def share(self, writer: str) -> float:
        """The fraction of all written tokens (EOS included) that `writer` wrote."""
        total = sum(len(w) for w in self.writers)
        return sum(w.count(writer) for w in self.writers) / total if total else 0.0


def check_prompts(prompts: Sequence[str]) -> None:
    """Raise ValueError when there is nothing to decode."""
    if isinstance(prompts, str):
        raise ValueError("prompts must be a list of strings, got one string (field: prompts)")
    if len(prompts) == 0:
        raise ValueError("prompts is empty (field: prompts): give at least one prompt")


def chunks(n: int, size: int) -> list[range]:
    """Index ranges of at most `size` rows, to bound the memory of one batch."""
    if size < 1:
        raise ValueError(f"batch_size must be >= 1 (field: batch_size), got {size}")
    return [range(s, min(n, s + size)) for s in range(0, n, size)]


def greedy(stepper: CausalStepper) -> torch.Tensor:
    """The argmax token of every row."""
    return stepper.logits.argmax(-1)


def greedy_decode(lm: CausalLM, prompts: Sequence[str], max_new_tokens: int) -> list[list[int]]:
    """Greedy token ids for each prompt through one stepper (the reference decoders
    compare to)."""
    stepper = CausalStepper(lm, [prompt_ids(lm.tokenizer, p) for p in prompts])

    def choose(_: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        token = greedy(stepper)
        return token, torch.zeros_like(token)

    tokens, _ = drive([stepper], choose, max_new_tokens)
    return tokens


def decode_text(lm: CausalLM, ids: Sequence[int]) -> str:
    """The text of written ids, cut at the first EOS."""
    eos = lm.eos_ids
    end = next((j for j, t in enumerate(ids) if t in eos), len(ids))
    return lm.tokenizer.decode(list(ids[:end]), skip_special_tokens=True)
