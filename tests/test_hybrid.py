"""The shared KV-cache stepper and token-level hybrid SLM/LLM decoding on the world's models."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from flywheel.decoders.hybrid import hybrid_decode, uncertain
from flywheel.decoders.stepping import (
    CausalLM,
    CausalStepper,
    check_same_vocab,
    greedy_decode,
    prompt_ids,
)
from flywheel.world.models import char_tokenizer, new_tiny_model
from flywheel.world.tasks import sample_tasks
from tests.helpers.greedy import hf_greedy

MAX_NEW = 10


@pytest.fixture(scope="module")
def small(world_models: Path, one_thread: None) -> CausalLM:
    return CausalLM.load(world_models / "world-small")


@pytest.fixture(scope="module")
def large(world_models: Path, one_thread: None) -> CausalLM:
    return CausalLM.load(world_models / "world-large")


@pytest.fixture(scope="module")
def prompts() -> list[str]:
    # lengths differ, so the batch is left padded
    tasks = sample_tasks(10, random.Random(3), min_len=3, max_len=8)
    return [t.prompt for t in tasks] + ["copy ab=", "reverse abcdefgh="]


def test_stepper_greedy_equals_generate(small: CausalLM, prompts: list[str]) -> None:
    assert greedy_decode(small, prompts, MAX_NEW) == hf_greedy(small, prompts, MAX_NEW)


def test_stepper_equals_generate_on_a_model_whose_output_depends_on_the_prompt(
    prompts: list[str], one_thread: None
) -> None:
    # a briefly trained world model may answer every prompt alike; larger random weights
    # make the output depend on the whole prompt, so padding mistakes would show
    model = new_tiny_model("small", seed=1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.mul_(3)
    lm = CausalLM(model.eval(), char_tokenizer(), "random-small")
    ours = greedy_decode(lm, prompts, MAX_NEW)
    assert ours == hf_greedy(lm, prompts, MAX_NEW)
    assert len({tuple(r) for r in ours}) > 1


def test_cache_grows_by_one_per_step_and_finished_rows_are_masked(
    small: CausalLM, prompts: list[str]
) -> None:
    encoded = [prompt_ids(small.tokenizer, p) for p in prompts]
    stepper = CausalStepper(small, encoded, want_hidden=True)
    width = max(len(e) for e in encoded)
    assert stepper.cache_length == width
    assert stepper.logits.shape == (len(prompts), len(small.tokenizer))
    assert stepper.hidden is not None and stepper.hidden.shape[0] == len(prompts)
    eos = small.tokenizer.eos_token_id
    for step in range(1, 4):
        token = stepper.logits.argmax(-1)
        if step == 1:
            token[0] = eos  # row 0 finishes now
        stepper.append(token)
        assert stepper.cache_length == width + step
        assert stepper.attention_mask.shape[1] == width + step
    assert bool(stepper.finished[0])
    # the EOS itself is attended to; what row 0 is fed afterwards is masked out
    assert stepper.attention_mask[0, width:].tolist() == [1, 0, 0]


def test_appends_queue_until_logits_are_read(small: CausalLM, prompts: list[str]) -> None:
    # a stepper read every step and one read only at the end see the same tokens; the
    # second runs the model twice (prompt, then the three queued tokens at once)
    encoded = [prompt_ids(small.tokenizer, p) for p in prompts]
    eager = CausalStepper(small, encoded, want_hidden=True)
    lazy = CausalStepper(small, encoded, want_hidden=True)
    assert lazy.forwards == 0  # nothing runs before logits are read
    for _ in range(3):
        token = eager.logits.argmax(-1)
        eager.append(token)
        lazy.append(token)
    assert torch.allclose(lazy.logits, eager.logits, atol=1e-5)
    assert torch.allclose(lazy.hidden, eager.hidden, atol=1e-5)
    assert (eager.forwards, lazy.forwards) == (4, 1)
    assert lazy.cache_length == eager.cache_length


def test_check_same_vocab_names_models_and_fix(world_models: Path, small: CausalLM) -> None:
    other = AutoTokenizer.from_pretrained(str(world_models / "world-large"))
    check_same_vocab(small.tokenizer, other, "world-small", "world-large")  # same: no error
    other.add_tokens(["@@"])
    with pytest.raises(ValueError, match="world-small and other-model.*same tokenizer"):
        check_same_vocab(small.tokenizer, other, "world-small", "other-model")


def test_never_triggering_threshold_is_the_small_model(
    small: CausalLM, large: CausalLM, prompts: list[str]
) -> None:
    # entropy can never exceed log(vocab) < 100 nats
    large_calls: list[int] = []
    hook = large.model.register_forward_hook(lambda *_: large_calls.append(1))
    try:
        out = hybrid_decode(small, large, prompts, threshold=100.0, max_new_tokens=MAX_NEW)
    finally:
        hook.remove()
    assert large_calls == []  # never asked, so it never ran
    assert out.token_ids == hf_greedy(small, prompts, MAX_NEW)
    assert out.share("large") == 0.0
    assert all(set(w) == {"small"} for w in out.writers)
    low = hybrid_decode(
        small, large, prompts, threshold=0.0, measure="max_prob", max_new_tokens=MAX_NEW
    )
    assert low.token_ids == out.token_ids and low.share("large") == 0.0


def test_always_triggering_threshold_is_the_large_model(
    small: CausalLM, large: CausalLM, prompts: list[str]
) -> None:
    out = hybrid_decode(
        small, large, prompts, threshold=1.0, measure="max_prob", max_new_tokens=MAX_NEW
    )
    assert out.token_ids == hf_greedy(large, prompts, MAX_NEW)
    assert out.share("large") == 1.0
    assert all(set(w) == {"large"} for w in out.writers)
    assert [len(w) for w in out.writers] == [len(t) for t in out.token_ids]


def test_share_counts_the_tokens_sent(small: CausalLM, large: CausalLM, prompts: list[str]) -> None:
    # a threshold between the lowest and highest first-step entropy sends some tokens,
    # not all
    stepper = CausalStepper(small, [prompt_ids(small.tokenizer, p) for p in prompts])
    logp = torch.log_softmax(stepper.logits.double(), -1)
    entropy = -(logp.exp() * logp).sum(-1)
    assert float(entropy.max()) > float(entropy.min())
    threshold = float(entropy.min() + entropy.max()) / 2
    out = hybrid_decode(small, large, prompts, threshold=threshold, max_new_tokens=MAX_NEW)
    sent = sum(w.count("large") for w in out.writers)
    total = sum(len(w) for w in out.writers)
    assert 0 < sent < total
    assert out.share("large") == pytest.approx(sent / total)
    # the first token's writer follows the small model's first-step entropy
    first = uncertain(stepper.logits, "entropy", threshold).tolist()
    assert [w[0] == "large" for w in out.writers] == first
    # every token is its writer's greedy choice given the whole text so far, re-read from
    # scratch: the large model's lazily caught-up cache gives what a full re-read gives
    models = {"small": small, "large": large}
    for prompt, ids, writers in zip(prompts, out.token_ids, out.writers, strict=True):
        for j, (token, writer) in enumerate(zip(ids, writers, strict=True)):
            lm = models[writer]
            context = torch.tensor([prompt_ids(lm.tokenizer, prompt) + ids[:j]])
            with torch.no_grad():
                assert int(lm.model(input_ids=context).logits[0, -1].argmax()) == token


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"threshold": -0.5}, "threshold"),
        ({"threshold": float("inf")}, "threshold"),
        ({"threshold": 1.5, "measure": "max_prob"}, "threshold"),
        ({"threshold": -0.1, "measure": "max_prob"}, "threshold"),
        ({"threshold": 0.5, "measure": "margin"}, "measure"),
        ({"threshold": 0.5, "prompts": []}, "prompts"),
        ({"threshold": 0.5, "max_new_tokens": -1}, "max_new_tokens"),
        ({"threshold": 0.5, "batch_size": 0}, "batch_size"),
    ],
)
def test_bad_inputs_fail_with_the_field_named(
    small: CausalLM, large: CausalLM, kwargs: dict, field: str
) -> None:
    call = {"prompts": ["copy abc="], **kwargs}
    with pytest.raises(ValueError, match=rf"field: {field}"):
        hybrid_decode(small, large, **call)


def test_different_tokenizers_fail_before_decoding(
    world_models: Path, small: CausalLM, large: CausalLM
) -> None:
    tok = AutoTokenizer.from_pretrained(str(world_models / "world-large"))
    tok.add_tokens(["@@"])
    other = CausalLM(large.model, tok, "big-other-vocab")
    with pytest.raises(ValueError, match="big-other-vocab.*same tokenizer"):
        hybrid_decode(small, other, ["copy abc="], threshold=1.0)
