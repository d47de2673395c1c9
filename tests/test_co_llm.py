"""Co-LLM on the world's models: base = world-small, assistant = world-large."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from flywheel.decoders.co_llm import (
    CoLLM,
    TrainingPhase,
    assistant_targets,
    co_llm_decode,
    example_key,
    init_head_weak,
    marginal_nll,
    sweep_eta,
    train_co_llm,
    train_marginal,
    weak_bce,
    weak_labels,
)
from flywheel.decoders.stepping import CausalLM
from flywheel.llm import TransformersBackend
from flywheel.world.tasks import check, sample_tasks
from tests.helpers.greedy import hf_greedy

MAX_NEW = 10


@pytest.fixture(scope="module")
def paths(world_models: Path, one_thread: None) -> tuple[Path, Path]:
    return world_models / "world-small", world_models / "world-large"


@pytest.fixture(scope="module")
def assistant(paths: tuple[Path, Path]) -> CausalLM:
    return CausalLM.load(paths[1])


@pytest.fixture(scope="module")
def tasks() -> list:
    return sample_tasks(48, random.Random(5))


@pytest.fixture(scope="module")
def examples(tasks: list) -> list[tuple[str, str]]:
    return [(t.prompt, t.answer) for t in tasks]


@pytest.fixture(scope="module")
def trained(
    paths: tuple[Path, Path], assistant: CausalLM, examples: list, tmp_path_factory
) -> CoLLM:
    """A briefly trained Co-LLM (its own copy of the base model)."""
    model, stats = train_co_llm(
        CausalLM.load(paths[0]),
        assistant,
        examples,
        targets_path=tmp_path_factory.mktemp("co_llm") / "targets.pt",
        init_steps=15,
        steps=10,
        batch_size=16,
    )
    assert stats["init"]["steps"] == 15 and stats["marginal"]["steps"] == 10
    return model


def argmax_at_targets(lm: CausalLM, prompt: str, answer: str) -> list[int]:
    """The model's argmax at each answer position (answer tokens + EOS), one unpadded row."""
    tok = lm.tokenizer
    p = tok(prompt, add_special_tokens=False)["input_ids"]
    a = tok(answer, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    with torch.no_grad():
        logits = lm.model(input_ids=torch.tensor([p + a])).logits[0]
    return logits[len(p) - 1 : len(p) + len(a) - 1].argmax(-1).tolist()


def test_weak_labels_are_assistant_right_and_base_wrong(
    paths: tuple[Path, Path], assistant: CausalLM, examples: list
) -> None:
    base = CausalLM.load(paths[0])
    batch = examples[:6]
    targets = assistant_targets(assistant, batch)
    labels = weak_labels(CoLLM(base), batch, targets)
    for (prompt, answer), row in zip(batch, labels, strict=True):
        tok = base.tokenizer
        gold = tok(answer, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        base_arg = argmax_at_targets(base, prompt, answer)
        asst_arg = argmax_at_targets(assistant, prompt, answer)
        expected = [
            int(a == g and b != g) for g, a, b in zip(gold, asst_arg, base_arg, strict=True)
        ]
        assert row == expected
    assert len(labels) == len(batch)
    # the stored argmax is the assistant's own
    key_rows = list(targets.values())
    assert key_rows[0]["argmax"].tolist() == argmax_at_targets(assistant, *batch[0])


def test_assistant_targets_are_stored_and_reused(
    assistant: CausalLM, examples: list, tmp_path: Path
) -> None:
    path = tmp_path / "targets.pt"
    first = assistant_targets(assistant, examples[:8], path=path)
    assert path.is_file()

    class NoForward(torch.nn.Module):
        device = torch.device("cpu")

        def forward(self, **_: object) -> None:
            raise AssertionError("the assistant ran again: stored log-probs were not reused")

    frozen = CausalLM(NoForward(), assistant.tokenizer, assistant.name)
    again = assistant_targets(frozen, examples[:8], path=path)
    assert again.keys() == first.keys()
    for key in first:
        assert torch.equal(first[key]["logprob"], again[key]["logprob"])
    # the log-probs match the assistant's own scoring of the answer
    with TransformersBackend(assistant.name) as backend:
        prompt, answer = examples[0]
        scored = backend.score([prompt], [answer + backend.tokenizer.eos_token])[0]
    assert first[example_key(prompt, answer)]["logprob"].tolist() == pytest.approx(scored, abs=1e-4)


def test_weak_init_and_marginal_training_lower_their_losses(
    paths: tuple[Path, Path], assistant: CausalLM, examples: list
) -> None:
    model = CoLLM(CausalLM.load(paths[0]))
    targets = assistant_targets(assistant, examples)
    with torch.no_grad():
        bce_before = weak_bce(model, examples, targets).item()
    init = init_head_weak(model, examples, targets, TrainingPhase(steps=20, batch_size=16, lr=1e-2))
    with torch.no_grad():
        assert weak_bce(model, examples, targets).item() < bce_before
    assert 0 <= init["positive_share"] <= 1
    with torch.no_grad():
        before = marginal_nll(model, examples, targets).item()
    train_marginal(model, examples, targets, TrainingPhase(steps=12, batch_size=16, lr=3e-3))
    with torch.no_grad():
        after = marginal_nll(model, examples, targets).item()
    assert after < before
    # the base model was fine-tuned along with the head; the assistant was not touched
    assert assistant.model.training is False


def test_eta_one_is_the_base_and_eta_zero_is_the_assistant(
    trained: CoLLM, assistant: CausalLM, tasks: list
) -> None:
    prompts = [t.prompt for t in tasks[:12]]
    assistant_calls: list[int] = []
    hook = assistant.model.register_forward_hook(lambda *_: assistant_calls.append(1))
    try:
        never = co_llm_decode(trained, assistant, prompts, eta=1.0, max_new_tokens=MAX_NEW)
    finally:
        hook.remove()
    assert assistant_calls == []  # never deferred to, so it never ran
    assert never.token_ids == hf_greedy(trained.base, prompts, MAX_NEW)
    assert never.share("assistant") == 0.0
    assert all(set(w) == {"base"} for w in never.writers)
    always = co_llm_decode(trained, assistant, prompts, eta=0.0, max_new_tokens=MAX_NEW)
    assert always.token_ids == hf_greedy(assistant, prompts, MAX_NEW)
    assert always.share("assistant") == 1.0
    assert [len(w) for w in always.writers] == [len(t) for t in always.token_ids]
    eos = assistant.eos_ids
    expected = [
        assistant.tokenizer.decode([t for t in row if t not in eos]) for row in always.token_ids
    ]
    assert always.texts == expected


def test_backend_assistant_gives_the_same_tokens(
    trained: CoLLM, assistant: CausalLM, tasks: list
) -> None:
    prompts = [t.prompt for t in tasks[:8]]
    with TransformersBackend(assistant.name) as backend:
        for eta in (0.0, 0.5):
            remote = co_llm_decode(trained, backend, prompts, eta=eta, max_new_tokens=MAX_NEW)
            local = co_llm_decode(trained, assistant, prompts, eta=eta, max_new_tokens=MAX_NEW)
            assert remote.token_ids == local.token_ids
            assert remote.writers == local.writers
            assert remote.texts == local.texts


def test_save_and_load_round_trip(trained: CoLLM, assistant: CausalLM, tmp_path: Path) -> None:
    folder = trained.save(tmp_path / "co-llm")
    loaded = CoLLM.load(folder)
    assert torch.equal(loaded.head.weight, trained.head.weight)
    prompts = ["reverse abcdef=", "sort dcba="]
    a = co_llm_decode(trained, assistant, prompts, eta=0.5, max_new_tokens=MAX_NEW)
    b = co_llm_decode(loaded, assistant, prompts, eta=0.5, max_new_tokens=MAX_NEW)
    assert a.token_ids == b.token_ids and a.writers == b.writers
    with pytest.raises(FileNotFoundError, match="field: folder"):
        CoLLM.load(tmp_path)


def test_sweep_eta_reports_accuracy_and_deferral(
    trained: CoLLM, assistant: CausalLM, tasks: list
) -> None:
    val = tasks[:16]
    report = sweep_eta(
        trained,
        assistant,
        [t.prompt for t in val],
        [t.answer for t in val],
        etas=[0.0, 0.5, 1.0],
        max_new_tokens=MAX_NEW,
    )
    assert report["scorer"] == "exact_match"
    results = report["results"]
    assert [r["eta"] for r in results] == [0.0, 0.5, 1.0]
    assert results[0]["deferral_share"] == 1.0 and results[-1]["deferral_share"] == 0.0
    best = max(r["score"] for r in results)
    chosen = next(r for r in results if r["eta"] == report["recommended_eta"])
    assert chosen["score"] == best
    ties = [r for r in results if r["score"] == best]
    assert chosen["deferral_share"] == min(r["deferral_share"] for r in ties)
    # the default scorer is the world's checker: each eta's score is its accuracy
    outputs = co_llm_decode(
        trained, assistant, [t.prompt for t in val], eta=0.5, max_new_tokens=MAX_NEW
    )
    accuracy = sum(check(t, text) for t, text in zip(val, outputs.texts, strict=True)) / len(val)
    assert results[1]["score"] == pytest.approx(accuracy)


def test_sweep_eta_needs_answers_for_a_reference_scorer(
    trained: CoLLM, assistant: CausalLM
) -> None:
    with pytest.raises(ValueError, match=r"answers\[0\] is missing.*field: answers"):
        sweep_eta(trained, assistant, ["copy abc="], etas=[0.5], max_new_tokens=2)
    with pytest.raises(ValueError, match="field: answers"):
        sweep_eta(trained, assistant, ["copy abc="], ["abc", "x"], etas=[0.5])
    with pytest.raises(ValueError, match="field: scorer"):
        sweep_eta(
            trained,
            assistant,
            ["copy abc="],
            scorer=lambda prompts, texts, answers: [],
            etas=[0.5],
            max_new_tokens=2,
        )


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"eta": -0.1}, "eta"),
        ({"eta": 1.5}, "eta"),
        ({"eta": "high"}, "eta"),
        ({"eta": 0.5, "prompts": []}, "prompts"),
        ({"eta": 0.5, "max_new_tokens": -2}, "max_new_tokens"),
    ],
)
def test_bad_inputs_fail_with_the_field_named(
    trained: CoLLM, assistant: CausalLM, kwargs: dict, field: str
) -> None:
    call = {"prompts": ["copy abc="], **kwargs}
    with pytest.raises(ValueError, match=rf"field: {field}"):
        co_llm_decode(trained, assistant, **call)


def test_different_tokenizers_fail_before_decoding(
    trained: CoLLM, assistant: CausalLM, paths: tuple[Path, Path], examples: list
) -> None:
    tok = AutoTokenizer.from_pretrained(str(paths[1]))
    tok.add_tokens(["@@"])
    other = CausalLM(assistant.model, tok, "other-vocab-model")
    with pytest.raises(ValueError, match="other-vocab-model.*same tokenizer"):
        co_llm_decode(trained, other, ["copy abc="], eta=0.5)
    with pytest.raises(ValueError, match="other-vocab-model.*same tokenizer"):
        train_co_llm(CausalLM.load(paths[0]), other, examples[:4], init_steps=1, steps=1)
    with pytest.raises(ValueError, match="field: etas"):
        sweep_eta(trained, assistant, ["copy abc="], ["abc"], etas=[])
    with pytest.raises(ValueError, match="field: examples"):
        train_co_llm(CausalLM.load(paths[0]), assistant, [], init_steps=1, steps=1)


def test_training_is_reproducible_from_its_seed(
    paths: tuple[Path, Path], assistant: CausalLM, examples: list
) -> None:
    def train(seed: int) -> CoLLM:
        torch.rand(3)  # moves the global random state, which the seed must override
        model, _ = train_co_llm(
            CausalLM.load(paths[0]), assistant, examples[:8], init_steps=2, steps=2, seed=seed
        )
        return model

    first, second, other = train(0), train(0), train(1)
    assert torch.equal(first.head.weight, second.head.weight)
    assert not torch.equal(first.head.weight, other.head.weight)


def test_init_steps_zero_skips_the_weak_supervision_start(
    paths: tuple[Path, Path], assistant: CausalLM, examples: list
) -> None:
    torch.manual_seed(0)
    untrained_head = CoLLM(CausalLM.load(paths[0])).head.weight.clone()
    model, stats = train_co_llm(
        CausalLM.load(paths[0]), assistant, examples[:8], init_steps=0, steps=1, seed=0
    )
    assert stats["init"] == {"steps": 0} and stats["marginal"]["steps"] == 1
    # one marginal step moved the seeded initial head, no BCE phase ran before it
    assert model.head.weight.shape == untrained_head.shape
    assert not torch.equal(model.head.weight, untrained_head)
