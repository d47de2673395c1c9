"""Tiny character-level Llama models for the embedded world.

The tokenizer is a real `tokenizers` BPE model with single characters as its
vocabulary and no merges, wrapped in `PreTrainedTokenizerFast`, so every
backend (transformers in process, `transformers serve`, vLLM) loads the saved
folder like any other model.
"""

from __future__ import annotations

import string
from pathlib import Path
from typing import Literal

from tokenizers import Tokenizer, decoders, models
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
# Letters, digits, the punctuation the world's prompts use, space and newline.
ALPHABET = string.ascii_lowercase + string.digits + " :=,.?!-_>|/()[]{}'\"#+*\n"

ModelSize = Literal["small", "large"]

# small is about 0.1M parameters, large about 1M (docs/world.md).
SIZES: dict[str, dict[str, int]] = {
    "small": dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4
    ),
    "large": dict(
        hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4
    ),
}


def char_tokenizer(vocab_size: int | None = None) -> PreTrainedTokenizerFast:
    """A character-level tokenizer that round-trips every string over ALPHABET.

    With `vocab_size`, filler tokens `<x0>`, `<x1>`, ... pad the vocabulary to that size
    (for speed runs with a real model's vocabulary; text still encodes to characters).
    """
    names = [PAD, BOS, EOS, UNK, *ALPHABET]
    if vocab_size is not None:
        names += [f"<x{i}>" for i in range(vocab_size - len(names))]
    vocab = {tok: i for i, tok in enumerate(names)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=UNK))
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        padding_side="left",
    )
    return fast


def new_tiny_model(size: ModelSize = "small", seed: int = 0) -> LlamaForCausalLM:
    """A randomly initialised Llama of the given size over the char vocabulary."""
    import torch

    if size not in SIZES:
        raise ValueError(f"size must be one of {sorted(SIZES)}, got {size!r}")
    tok = char_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tok),
        max_position_embeddings=256,
        num_key_value_heads=SIZES[size]["num_attention_heads"],
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        tie_word_embeddings=True,
        **SIZES[size],
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def save_tiny(model: LlamaForCausalLM, path: str | Path) -> Path:
    """Save model and tokenizer with `save_pretrained` so any backend loads the folder."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    char_tokenizer().save_pretrained(path)
    return path
