"""What a user brings, built in the test with nothing downloaded: English text data and
small real-architecture models (Llama, Qwen2, GPT-2) sharing one byte-level BPE
tokenizer trained on the spot, with a ChatML chat template and no pad token.

The models are untrained (random weights): tests on them check plumbing and accounting,
never quality.
"""

from __future__ import annotations

import random
from pathlib import Path

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

TOPICS = ["the garden", "a bicycle", "the kitchen", "rainy weather", "a small library", "trains"]
QUALITIES = ["clear", "kind", "short", "accurate", "detailed", "polite"]


def english_corpus(n: int = 400, seed: int = 0) -> list[str]:
    """Plain English sentences for training the tokenizer."""
    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        topic, quality = rng.choice(TOPICS), rng.choice(QUALITIES)
        lines.append(
            f"Please write a {quality} note about {topic}. "
            f"Here is a {quality} note about {topic}: it is worth a visit on a quiet day."
        )
    return lines


def preference_rows(n: int = 40, seed: int = 0, chat: bool = False) -> list[dict]:
    """Preference pairs in English (prompt, chosen, rejected, group); with `chat`, prompts
    are chat messages and answers are assistant messages."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        topic, quality = rng.choice(TOPICS), rng.choice(QUALITIES)
        prompt = f"Write a {quality} sentence about {topic} (request {i})."
        chosen = f"Here is a {quality} sentence about {topic}: it is calm and pleasant."
        rejected = f"{topic} whatever."
        group = "short" if i % 2 else "long"
        if chat:
            rows.append(
                {
                    "prompt": [
                        {"role": "system", "content": "You answer briefly."},
                        {"role": "user", "content": prompt},
                    ],
                    "chosen": [{"role": "assistant", "content": chosen}],
                    "rejected": [{"role": "assistant", "content": rejected}],
                    "group": group,
                }
            )
        else:
            rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected, "group": group})
    return rows


def train_tokenizer(folder: Path, *, pad_token: bool = False, vocab_size: int = 400):
    """A byte-level BPE tokenizer trained on `english_corpus`, saved to `folder`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    raw.train_from_iterator(english_corpus(), trainer=trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=raw,
        bos_token="<|endoftext|>",
        eos_token="<|im_end|>",
        additional_special_tokens=["<|im_start|>"],
    )
    if pad_token:
        tok.pad_token = "<|endoftext|>"
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(folder)
    return tok


def build_model(folder: Path, arch: str, tok, *, seed: int = 0) -> Path:
    """A random-weight causal LM of a few hundred thousand parameters, saved with `tok`."""
    import torch
    from transformers import (
        GPT2Config,
        GPT2LMHeadModel,
        LlamaConfig,
        LlamaForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    torch.manual_seed(seed)
    vocab = len(tok)
    ids = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    if arch == "llama":
        config = LlamaConfig(
            vocab_size=vocab,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=512,
            **ids,
        )
        model = LlamaForCausalLM(config)
    elif arch == "qwen2":
        config = Qwen2Config(
            vocab_size=vocab,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=512,
            **ids,
        )
        model = Qwen2ForCausalLM(config)
    elif arch == "gpt2":
        config = GPT2Config(
            vocab_size=vocab, n_embd=64, n_layer=2, n_head=4, n_positions=512, **ids
        )
        model = GPT2LMHeadModel(config)
    else:
        raise ValueError(f"unknown arch {arch!r}")
    model.generation_config.eos_token_id = tok.eos_token_id
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def build_own_models(root: Path, archs: tuple[str, ...] = ("llama", "qwen2", "gpt2")) -> dict:
    """{arch: folder} for each architecture, all with one tokenizer (no pad token)."""
    tok = train_tokenizer(root / "tokenizer")
    return {arch: build_model(root / arch, arch, tok, seed=i) for i, arch in enumerate(archs)}
