"""GR-DPO, Co-LLM and LoRA adapters on models a user brings: Llama, Qwen2 and GPT-2 on one
BPE tokenizer with a chat template and no pad token, data as chat messages, and a
max_length that cuts known examples. Untrained models: plumbing and accounting only."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer

from flywheel.alignment.group_robust import (
    GroupDataError,
    GroupRobustConfig,
    check_groups,
    encode_pairs,
    load_tokenizer,
    make_trainer,
    train_group_robust,
)
from flywheel.decoders.co_llm import (
    CoLLM,
    co_llm_decode,
    encode_examples,
    exact_match,
    rouge_l_f,
    sweep_eta,
    train_co_llm,
)
from flywheel.decoders.stepping import CausalLM
from flywheel.selectors.adapters import LoraTraining, SelectorInputError, train_lora
from flywheel.synthesis.rouge import rouge_l
from tests.helpers.own_models import QUALITIES, TOPICS, build_own_models, preference_rows

MAX_LENGTH = 128  # a plain pair is ~105 tokens; a padded one ~170
PADDING = "Keep in mind that the reader likes calm gardens and quiet trains. " * 4
LONG_PAIRS = {0, 3, 4, 9, 13}  # row indices; even rows are group "long", odd "short"


@pytest.fixture(scope="module")
def own(tmp_path_factory: pytest.TempPathFactory, one_thread: None) -> dict[str, Path]:
    return build_own_models(tmp_path_factory.mktemp("own-models"))


def chat_pairs(n: int, seed: int) -> list[dict]:
    """Chat-format pairs; those in LONG_PAIRS carry a long system message."""
    rows = preference_rows(n, seed=seed, chat=True)
    for i in LONG_PAIRS & set(range(n)):
        system = rows[i]["prompt"][0]
        rows[i]["prompt"][0] = {**system, "content": system["content"] + " " + PADDING}
    return rows


def expected_cuts(rows: list[dict]) -> dict[str, int]:
    return {
        g: sum(1 for i in LONG_PAIRS if i < len(rows) and rows[i]["group"] == g)
        for g in ("long", "short")
    }


def full_length(tok, row: dict) -> int:
    """Tokens of the prompt and the longer answer, rendered by the template itself."""
    lengths = []
    for side in ("chosen", "rejected"):
        text = tok.apply_chat_template(row["prompt"] + row[side], tokenize=False)
        lengths.append(len(tok(text, add_special_tokens=False)["input_ids"]))
    return max(lengths)


def gr_config(path: Path, **kw) -> GroupRobustConfig:
    defaults = dict(base_model=str(path), batch_size=8, max_steps=2, max_length=MAX_LENGTH)
    return GroupRobustConfig(**{**defaults, **kw})


def test_the_own_data_is_cut_where_the_test_says(own: dict[str, Path]) -> None:
    tok = AutoTokenizer.from_pretrained(own["llama"])
    assert tok.pad_token is None and AutoTokenizer.from_pretrained(own["gpt2"]).pad_token is None
    rows = chat_pairs(20, seed=0)
    over = {i for i, r in enumerate(rows) if full_length(tok, r) > MAX_LENGTH}
    assert over == LONG_PAIRS


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_gr_dpo_on_chat_pairs_counts_what_max_length_cuts(
    own: dict[str, Path], arch: str, tmp_path: Path
) -> None:
    train, held = chat_pairs(20, seed=0), chat_pairs(10, seed=1)
    report = train_group_robust(train, held, gr_config(own[arch]), tmp_path)
    assert report["steps"] == 2
    for name, rows in (("train", train), ("eval", held)):
        length = report["length"][name]
        cuts = expected_cuts(rows)
        for group, figures in length["by_group"].items():
            size = sum(r["group"] == group for r in rows)
            assert (figures["texts"], figures["truncated"], figures["dropped"]) == (
                size,
                cuts[group],
                0,
            )
            assert figures["max_length"] == MAX_LENGTH
        assert length["all"]["truncated"] == sum(cuts.values())
        assert length["all"]["longest"] > MAX_LENGTH
    assert {g: e["pairs"] for g, e in report["held_out"]["groups"].items()} == {
        "long": 5,
        "short": 5,
    }
    assert (tmp_path / "model.safetensors").exists()


def test_gr_dpo_pairs_reach_trl_rendered_and_within_max_length(
    own: dict[str, Path], tmp_path: Path
) -> None:
    rows, _ = check_groups(chat_pairs(20, seed=0), "group", "train")
    trainer = make_trainer(rows, gr_config(own["llama"]), tmp_path)
    tok = trainer.processing_class
    assert tok.pad_token_id is not None  # a stand-in for the missing pad token
    data = trainer.train_dataset
    assert len(data) == 20
    for i, example in enumerate(data):
        longer = max(len(example["chosen_ids"]), len(example["rejected_ids"]))
        assert len(example["prompt_ids"]) + longer <= MAX_LENGTH
        prompt = tok.decode(example["prompt_ids"])
        assert prompt.endswith("<|im_start|>assistant\n")
        # a cut prompt loses its start (the system message), never its end
        assert prompt.startswith("<|im_start|>system") == (i not in LONG_PAIRS)
        assert tok.decode(example["chosen_ids"]).endswith("<|im_end|>\n")
    # one batch through the robust loss: the collator pads with the stand-in
    batch = trainer.data_collator([data[i] for i in range(4)])
    assert torch.isfinite(trainer.compute_loss(trainer.model, batch))


def test_gr_dpo_drop_leaves_the_long_pairs_out(own: dict[str, Path], tmp_path: Path) -> None:
    train, held = chat_pairs(20, seed=0), chat_pairs(10, seed=1)
    report = train_group_robust(train, held, gr_config(own["llama"], over_length="drop"), tmp_path)
    for name, rows in (("train", train), ("eval", held)):
        by_group = report["length"][name]["by_group"]
        assert {g: f["dropped"] for g, f in by_group.items()} == expected_cuts(rows)
        assert all(f["truncated"] == 0 for f in by_group.values())
    pairs = {g: e["pairs"] for g, e in report["held_out"]["groups"].items()}
    cuts = expected_cuts(held)
    assert pairs == {g: 5 - cuts[g] for g in ("long", "short")}


def test_gr_dpo_raw_format_and_a_group_left_empty(own: dict[str, Path]) -> None:
    tok = load_tokenizer(str(own["llama"]))
    rows, _ = check_groups(chat_pairs(4, seed=0), "group", "train")
    raw, _ = encode_pairs(
        tok, rows, gr_config(own["llama"], prompt_format="raw", max_length=512), "t"
    )
    prompt = tok.decode(raw[1]["prompt_ids"])
    assert prompt.startswith("system: You answer briefly.\nuser: Write a") and prompt.endswith(
        "assistant:"
    )
    assert raw[1]["chosen_ids"][-1] == tok.eos_token_id  # raw answers end with EOS
    with pytest.raises(GroupDataError, match=r"max_length=8.*raise `max_length`.*over_length"):
        encode_pairs(tok, rows, gr_config(own["llama"], max_length=8, over_length="drop"), "t")


# --- Co-LLM: llama base, qwen2 assistant, one tokenizer, no pad token ---

CO_MAX_LENGTH = 64  # a plain example is ~50 tokens; a padded one ~200
CO_LONG = {1, 2, 7}


def co_examples(n: int = 16) -> list[tuple[list[dict], str]]:
    rng = random.Random(0)
    out = []
    for i in range(n):
        topic, quality = rng.choice(TOPICS), rng.choice(QUALITIES)
        extra = " " + PADDING if i in CO_LONG else ""
        prompt = [
            {"role": "user", "content": f"Please write a {quality} note about {topic}.{extra}"}
        ]
        answer = f"Here is a {quality} note about {topic}: it is worth a visit on a quiet day."
        out.append((prompt, answer))
    return out


@pytest.fixture(scope="module")
def co_llm(own: dict[str, Path]) -> tuple[CoLLM, CausalLM, dict]:
    base, assistant = CausalLM.load(own["llama"]), CausalLM.load(own["qwen2"])
    assert base.tokenizer.pad_token is None
    model, stats = train_co_llm(
        base,
        assistant,
        co_examples(),
        init_steps=3,
        steps=30,
        batch_size=8,
        lr=3e-3,
        max_length=CO_MAX_LENGTH,
    )
    return model, assistant, stats


def test_co_llm_trains_on_chat_examples_and_counts_cuts(co_llm, own: dict[str, Path]) -> None:
    model, _, stats = co_llm
    assert stats["marginal"]["steps"] == 30 and stats["prompt_format"] == "chat"
    assert stats["length"] == {
        "max_length": CO_MAX_LENGTH,
        "over_length": "truncate",
        "texts": 16,
        "truncated": len(CO_LONG),
        "dropped": 0,
        "longest": stats["length"]["longest"],
    }
    assert stats["length"]["longest"] > CO_MAX_LENGTH
    tok = AutoTokenizer.from_pretrained(own["llama"])
    full = [
        tok.apply_chat_template([*p, {"role": "assistant", "content": a}], tokenize=False)
        for p, a in co_examples()
    ]
    over = {i for i, t in enumerate(full) if len(tok(t)["input_ids"]) > CO_MAX_LENGTH}
    assert over == CO_LONG  # the examples are cut where the test says
    encoded, report = encode_examples(
        tok, co_examples(), max_length=CO_MAX_LENGTH, over_length="drop"
    )
    assert (len(encoded), report.dropped) == (16 - len(CO_LONG), len(CO_LONG))
    assert all(len(e.ids) <= CO_MAX_LENGTH for e in encoded)
    assert tok.decode(encoded[0].ids[: encoded[0].n_prompt]).endswith("<|im_start|>assistant\n")


def test_eta_sweep_scores_free_text_with_rouge_l(co_llm, tmp_path: Path) -> None:
    model, assistant, _ = co_llm
    val = co_examples()[8:14]
    prompts, answers = [p for p, _ in val], [a for _, a in val]
    report = sweep_eta(
        model, assistant, prompts, answers, scorer=rouge_l_f, etas=[0.0, 1.0], max_new_tokens=16
    )
    assert report["scorer"] == "rouge_l"
    scores = [r["score"] for r in report["results"]]
    assert any(s > 0 for s in scores)  # exact match gives 0.0 at every eta on free text
    best = next(r for r in report["results"] if r["eta"] == report["recommended_eta"])
    assert best["score"] == max(scores)
    # a saved pair decodes its chat prompts as trained, and each eta's score is the mean ROUGE-L
    loaded = CoLLM.load(model.save(tmp_path / "pair"))
    assert loaded.prompt_format == "chat"
    texts = co_llm_decode(loaded, assistant, prompts, eta=1.0, max_new_tokens=16).texts
    mean = sum(rouge_l(t, a) for t, a in zip(texts, answers, strict=True)) / len(texts)
    assert scores[1] == pytest.approx(mean)


def test_scorers_match_their_definitions() -> None:
    prompts = ["p", "p", "p"]
    completions = [" a quiet day ", "the cat sat", "dog"]
    answers = ["a quiet day", "The cat sat down", "cat"]
    assert exact_match(prompts, completions, answers) == [1.0, 0.0, 0.0]
    # LCS 3 of 3 and 4 words: precision 1, recall 0.75
    assert rouge_l_f(prompts, completions, answers) == pytest.approx([1.0, 2 * 0.75 / 1.75, 0.0])
    with pytest.raises(ValueError, match=r"answers\[1\] is missing.*field: answers"):
        rouge_l_f(prompts, completions, ["x", None, "y"])


# --- LoRA adapters: the architecture's own projections, or the ones named ---

LORA_PAIRS = [("Please write a kind note about trains.", "Here is a kind note about trains.")] * 4
FOUND = {
    "gpt2": ["c_attn", "c_fc", "c_proj"],
    "qwen2": ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"],
}


def lora_weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "adapter_model.safetensors"))


@pytest.mark.parametrize("arch", ["gpt2", "qwen2"])
def test_lora_finds_the_targets_of_the_architecture(
    own: dict[str, Path], arch: str, tmp_path: Path
) -> None:
    training = LoraTraining(rank=2, steps=2, batch_size=4)
    stats = train_lora(own[arch], LORA_PAIRS, tmp_path, training)
    assert stats["steps"] == 2 and stats["target_modules"] == FOUND[arch]
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert sorted(config["target_modules"]) == FOUND[arch]
    assert config["fan_in_fan_out"] == (arch == "gpt2")  # GPT-2's Conv1D
    weights = lora_weights(tmp_path)
    adapted = {k.split(".lora_")[0].rsplit(".", 1)[-1] for k in weights}
    assert sorted(adapted) == FOUND[arch]
    # lora_B starts at zero: trained, it moved
    assert any(v.abs().sum() > 0 for k, v in weights.items() if "lora_B" in k)


def test_lora_target_modules_given_are_honoured_or_named(
    own: dict[str, Path], tmp_path: Path
) -> None:
    training = LoraTraining(rank=2, steps=1, batch_size=4, target_modules=["c_attn"])
    stats = train_lora(own["gpt2"], LORA_PAIRS, tmp_path / "given", training)
    assert stats["target_modules"] == ["c_attn"]
    assert all(".c_attn.lora_" in k for k in lora_weights(tmp_path / "given"))
    bogus = LoraTraining(rank=2, steps=1, batch_size=4, target_modules=["q_proj", "c_fc"])
    with pytest.raises(SelectorInputError, match=r"target_modules: \['q_proj'\] name no .*c_attn"):
        train_lora(own["gpt2"], LORA_PAIRS, tmp_path / "bogus", bogus)
