"""In-process backend on Hugging Face transformers: batched, left padded, KV cache; chat
prompts rendered with the model's chat template."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from flywheel.llm.base import Backend, ModelNotFound, TokenLogprob, check_pairs, cut_at_stop
from flywheel.llm.chat import Prompt, PromptFormat, end_of_turn_ids, render_prompt, resolve_format
from flywheel.llm.tokens import ensure_pad_token
from flywheel.llm.usage import counts_for


class TransformersBackend(Backend):
    """A causal LM loaded in this process from a local folder or the local hub cache.

    With prompt format `chat` (the default for a tokenizer with a chat template), prompts
    are rendered with the template, the assistant turn opened, and generation also stops
    at the template's end-of-turn token. `next_token_topk` reads its prefixes as raw text:
    decoders continue text they already rendered.
    """

    def __init__(
        self,
        model: str | Path,
        *,
        device: str = "cpu",
        batch_size: int = 32,
        dtype: torch.dtype | str | None = None,
        prompt_format: PromptFormat = "auto",
    ) -> None:
        self.model = str(model)
        self.device = torch.device(device)
        self.batch_size = batch_size
        # local_files_only: never download, a folder or the local hub cache only.
        kwargs: dict[str, Any] = {"local_files_only": True}
        if dtype is not None:
            kwargs["dtype"] = dtype
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(self.model, **kwargs)
            self.lm = AutoModelForCausalLM.from_pretrained(self.model, **kwargs)
        except (OSError, ValueError) as e:
            if Path(model).is_dir():  # it exists but does not load: not a "not found"
                raise
            raise ModelNotFound(
                f"model {self.model!r} is not an existing folder and is not in the local "
                f"Hugging Face cache ({e}). Pass an existing model folder, or run "
                "`flywheel world bootstrap` to create the tiny world models."
            ) from e
        self.lm.to(self.device).eval()
        # Left padding keeps every prompt's last token at the end of the batch,
        # which generation and next-token scoring both rely on.
        self.tokenizer.padding_side = "left"
        ensure_pad_token(self.tokenizer)
        self.prompt_format = resolve_format(prompt_format, self.tokenizer)
        self._eos_ids = self._find_eos_ids()
        # prompts and tokens, summed into the record of the run open now (if any)
        self.counts = counts_for("transformers", self.model)

    def _find_eos_ids(self) -> set[int]:
        ids = self.lm.generation_config.eos_token_id
        ids = set() if ids is None else {ids} if isinstance(ids, int) else set(ids)
        if self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        if self.prompt_format == "chat":
            ids |= end_of_turn_ids(self.tokenizer)
        return ids

    def _count(self, inputs: Sequence[Sequence[int]]) -> None:
        self.counts.requests += len(inputs)
        self.counts.prompt_tokens += sum(len(x) for x in inputs)

    def _batches(self, lengths: Sequence[int]) -> Iterator[list[int]]:
        """Indices sorted by length and chunked, so each batch pads little."""
        order = sorted(range(len(lengths)), key=lambda i: lengths[i])
        for start in range(0, len(order), self.batch_size):
            yield order[start : start + self.batch_size]

    def _prompt_ids(self, prompt: Prompt) -> list[int]:
        text = render_prompt(self.tokenizer, prompt, self.prompt_format)
        # a rendered template already holds its special tokens (BOS included)
        return self._raw_ids(text, add_special_tokens=self.prompt_format != "chat")

    def _raw_ids(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = self.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]
        if not ids:  # nothing to condition on: start from BOS
            if self.tokenizer.bos_token_id is None:
                raise ValueError("empty prompt and the tokenizer has no BOS token")
            ids = [self.tokenizer.bos_token_id]
        return ids

    def _pad(self, seqs: Sequence[list[int]]) -> dict[str, torch.Tensor]:
        """Left-pad token id lists into input_ids, attention_mask and position_ids."""
        batch = self.tokenizer.pad({"input_ids": list(seqs)}, return_tensors="pt")
        mask = batch["attention_mask"]
        # Positions count real tokens only, so padding does not shift them.
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        return {
            "input_ids": batch["input_ids"].to(self.device),
            "attention_mask": mask.to(self.device),
            "position_ids": positions.to(self.device),
        }

    @torch.inference_mode()
    def generate(
        self,
        prompts: Sequence[Prompt],
        *,
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        stop: Sequence[str] | None = None,
        seed: int | None = None,
    ) -> list[str]:
        """Greedy when temperature == 0, else sampling (reproducible with `seed`)."""
        ids = [self._prompt_ids(p) for p in prompts]
        self._count(ids)
        if temperature > 0:
            sampling: dict[str, Any] = dict(
                do_sample=True, temperature=temperature, top_k=0, top_p=1.0
            )
            if seed is not None:
                torch.manual_seed(seed)
        else:
            sampling = dict(do_sample=False)
        stops = [s for s in stop or [] if s]
        if stops:  # lets rows finish early; the text is still cut below
            sampling.update(stop_strings=stops, tokenizer=self.tokenizer)
        out: list[str] = [""] * len(prompts)
        for idx in self._batches([len(x) for x in ids]):
            inputs = self._pad([ids[i] for i in idx])
            inputs.pop("position_ids")  # generate derives them from the mask
            seqs = self.lm.generate(
                **inputs,
                max_new_tokens=max_new_tokens,
                pad_token_id=self.tokenizer.pad_token_id,
                **sampling,
            )
            new = seqs[:, inputs["input_ids"].shape[1] :].tolist()
            for i, row in zip(idx, new, strict=True):
                end = next((j for j, t in enumerate(row) if t in self._eos_ids), len(row))
                self.counts.completion_tokens += end
                text = self.tokenizer.decode(row[:end], skip_special_tokens=True)
                out[i] = cut_at_stop(text, stops)
        return out

    @torch.inference_mode()
    def score(self, prompts: Sequence[Prompt], completions: Sequence[str]) -> list[list[float]]:
        """Log-probs of each completion token; prompt and completion are tokenized
        separately so the boundary is exact. A chat prompt is rendered with its assistant
        turn opened, so the completion is scored as the assistant's answer."""
        check_pairs(prompts, completions)
        pids = [self._prompt_ids(p) for p in prompts]
        cids = [self.tokenizer(c, add_special_tokens=False)["input_ids"] for c in completions]
        out: list[list[float]] = [[] for _ in prompts]
        seqs = [p + c for p, c in zip(pids, cids, strict=True)]
        self._count(seqs)
        for idx in self._batches([len(s) for s in seqs]):
            n_max = max(len(cids[i]) for i in idx)
            if n_max == 0:
                continue
            inputs = self._pad([seqs[i] for i in idx])
            logits = self.lm(**inputs).logits
            # Logits at position t predict token t + 1; with left padding every
            # completion ends at the last position.
            logps = torch.log_softmax(logits[:, -n_max - 1 : -1].float(), dim=-1)
            targets = inputs["input_ids"][:, -n_max:]
            picked = logps.gather(-1, targets.unsqueeze(-1)).squeeze(-1).tolist()
            for row, i in zip(picked, idx, strict=True):
                n = len(cids[i])
                out[i] = row[n_max - n :] if n else []
        return out

    @torch.inference_mode()
    def next_token_topk(self, prefixes: Sequence[str], k: int = 5) -> list[list[TokenLogprob]]:
        """Top-k next tokens after each raw-text prefix, sorted by logprob descending."""
        ids = [self._raw_ids(p) for p in prefixes]
        self._count(ids)
        out: list[list[TokenLogprob]] = [[] for _ in prefixes]
        for idx in self._batches([len(x) for x in ids]):
            logits = self.lm(**self._pad([ids[i] for i in idx])).logits[:, -1]
            top = torch.log_softmax(logits.float(), dim=-1).topk(k, dim=-1)
            for i, values, tokens in zip(
                idx, top.values.tolist(), top.indices.tolist(), strict=True
            ):
                out[i] = [
                    TokenLogprob(self.tokenizer.decode([t]), v)
                    for t, v in zip(tokens, values, strict=True)
                ]
        return out

    def close(self) -> None:
        """Drop the model so its memory can be freed."""
        self.lm = None  # type: ignore[assignment]
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
