"""Reward models on what users bring: Llama, Qwen2 and GPT-2 on a tokenizer with a chat
template and no pad token, preference rows in chat messages (read back from parquet) and
strings mixed, texts longer than max_length and than GPT-2's 512 positions.

The models are untrained: these tests check plumbing and accounting, never quality.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from transformers import AutoModel, AutoTokenizer

from flywheel.reward_models import ugda
from flywheel.reward_models.bradley_terry import (
    PreferenceDataError,
    RewardModel,
    RewardTrainingConfig,
    train_reward_model,
)
from flywheel.reward_models.ensemble import (
    EnsembleConfig,
    EnsembleRewardModel,
    decoder_blocks,
    encoder_for,
    load_ensemble,
    train_ensemble,
)
from tests.helpers.own_models import build_own_models, preference_rows

ARCHS = ("llama", "qwen2", "gpt2")
MAX_LENGTH = 128
# hundreds of tokens: over MAX_LENGTH, and over GPT-2's 512 positions
LONG = " ".join(["the garden is calm and pleasant"] * 100)
# AutoTokenizer loads the shared tokenizer for a qwen2 model as Qwen2Tokenizer, which
# brings its own pad token (`<|endoftext|>`), as Qwen's do; the others have none
STAND_IN = {"llama": "eos_token", "qwen2": None, "gpt2": "eos_token"}


@pytest.fixture(scope="module")
def own(tmp_path_factory) -> dict[str, Path]:
    return build_own_models(tmp_path_factory.mktemp("own"))


def via_parquet(rows: list[dict], folder: Path) -> list[dict]:
    """Rows as a parquet file gives them back: messages become numpy arrays of dicts."""
    pq.write_table(pa.Table.from_pylist(rows), folder / "rows.parquet")
    return pq.read_table(folder / "rows.parquet").to_pandas().to_dict("records")


def template_length(tok, row: dict, answer: str) -> int:
    """Tokens of the whole exchange as the chat template writes it, + EOS."""
    prompt = row["prompt"]
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    text = tok.apply_chat_template(
        [*messages, {"role": "assistant", "content": answer}], tokenize=False
    )
    return len(tok(text, add_special_tokens=False)["input_ids"]) + 1


def mixed_rows(own: dict, long_pairs: int, folder: Path) -> list[dict]:
    """Chat pairs from parquet, string pairs, and `long_pairs` string pairs whose chosen
    answer is LONG; every other text fits in MAX_LENGTH (checked)."""
    chat = preference_rows(10, chat=True)
    plain = preference_rows(10, seed=1)
    tok = AutoTokenizer.from_pretrained(own["llama"])  # the tokenizer all three share
    for row in chat + plain:
        for key in ("chosen", "rejected"):
            answer = row[key] if isinstance(row[key], str) else row[key][0]["content"]
            assert template_length(tok, row, answer) < MAX_LENGTH
    long = [{**r, "chosen": f"{r['chosen']} {LONG}"} for r in preference_rows(long_pairs, 2)]
    return via_parquet(chat, folder) + plain + long


def eval_rows() -> list[dict]:
    return preference_rows(9, seed=3, chat=True) + preference_rows(8, seed=4)  # 17 pairs


def recount(chosen: list[float], rejected: list[float]) -> float:
    wins = [1.0 if c > r else 0.5 if c == r else 0.0 for c, r in zip(chosen, rejected, strict=True)]
    return sum(wins) / len(wins)


@pytest.mark.parametrize("arch", ARCHS)
def test_bt_trains_on_chat_and_string_rows_and_scores_long_texts(own, arch, tmp_path) -> None:
    rows, evaluation = mixed_rows(own, 3, tmp_path), eval_rows()
    assert not isinstance(rows[0]["prompt"], list)  # parquet's numpy arrays, not lists
    config = RewardTrainingConfig(base_model=str(own[arch]), batch_size=8, max_length=MAX_LENGTH)
    report = train_reward_model(rows, evaluation, config, tmp_path / "rm")
    assert report["prompt_format"] == "chat" and report["pad_token_stand_in"] == STAND_IN[arch]
    # TRL trained on every pair: none left out for length behind our back
    assert report["trained_pairs"] == len(rows) == report["length"]["train"]["pairs"]
    train = report["length"]["train"]
    assert (train["texts"], train["truncated"], train["dropped"]) == (2 * len(rows), 3, 0)
    assert train["longest"] > 512
    assert report["length"]["eval"]["truncated"] == 0 and report["eval_pairs"] == 17
    saved = json.loads((tmp_path / "rm" / "reward_stats.json").read_text())
    assert saved["length"] == report["length"] and saved["max_length"] == MAX_LENGTH

    rm = RewardModel(tmp_path / "rm")
    prompts = [r["prompt"] for r in evaluation]
    chosen = rm.score(prompts, [r["chosen"] for r in evaluation])
    rejected = rm.score(prompts, [r["rejected"] for r in evaluation])
    # accuracy over the 17 pairs, not a mean over batches
    assert report["eval_pairwise_accuracy"] == pytest.approx(recount(chosen, rejected))
    scores = rm.score([LONG, evaluation[0]["prompt"]], [LONG, "short"])
    assert len(scores) == 2 and all(math.isfinite(s) for s in scores)
    assert (rm.length.texts, rm.length.truncated) == (2 * 17 + 2, 1)
    assert rm.length.longest > 512


def test_over_length_drop_leaves_long_pairs_out_and_counts_them(own, tmp_path) -> None:
    rows = mixed_rows(own, 4, tmp_path)
    config = RewardTrainingConfig(
        base_model=str(own["gpt2"]),
        batch_size=8,
        max_length=MAX_LENGTH,
        over_length="drop",
        prompt_format="raw",
    )
    report = train_reward_model(rows, eval_rows(), config, tmp_path / "rm")
    assert report["trained_pairs"] == len(rows) - 4
    train = report["length"]["train"]
    assert (train["dropped"], train["pairs_dropped"], train["truncated"]) == (4, 4, 0)
    assert report["prompt_format"] == "raw"
    assert RewardModel(tmp_path / "rm").encoder.prompt_format == "raw"
    with pytest.raises(PreferenceDataError, match=r"train pairs: all 4 pair\(s\) are longer"):
        train_reward_model(rows[-4:], eval_rows(), config, tmp_path / "none-left")
    with pytest.raises(ValueError, match=r"max_length: 1024 is more than the 512 positions"):
        train_reward_model(
            rows, eval_rows(), config.model_copy(update={"max_length": 1024}), tmp_path / "no"
        )


@pytest.mark.parametrize("arch", ARCHS)
def test_ensemble_trains_on_the_tokenizer_without_a_pad_token(own, arch, tmp_path) -> None:
    rows, evaluation = mixed_rows(own, 2, tmp_path), eval_rows()
    config = EnsembleConfig(
        base_model=str(own[arch]), members=2, batch_size=8, max_length=MAX_LENGTH
    )
    figures = train_ensemble(rows, evaluation, config, tmp_path / "ens")
    assert figures["pad_token_stand_in"] == STAND_IN[arch] and figures["prompt_format"] == "chat"
    assert figures["trained_pairs"] == len(rows) and figures["length"]["train"]["truncated"] == 2

    ensemble = EnsembleRewardModel(tmp_path / "ens")
    prompts = [r["prompt"] for r in evaluation]
    chosen = ensemble.score(prompts, [r["chosen"] for r in evaluation])["members"]
    rejected = ensemble.score(prompts, [r["rejected"] for r in evaluation])["members"]
    accuracy = figures["eval_pairwise_accuracy"]
    assert accuracy["pairs"] == 17
    for m in range(2):  # per-member normalisation keeps each member's order
        member = recount([c[m] for c in chosen], [r[m] for r in rejected])
        assert accuracy["members"][m] == pytest.approx(member)
    long = ensemble.score([LONG], [LONG])
    assert all(math.isfinite(x) for x in long["members"][0])
    assert ensemble.length.truncated == 1 and ensemble.length.longest > 512


def test_ugda_takes_the_last_block_of_gpt2_and_its_gradients_are_exact(own, tmp_path) -> None:
    for arch in ("llama", "qwen2"):
        backbone = AutoModel.from_pretrained(own[arch])
        assert decoder_blocks(backbone) is backbone.layers
    rows = preference_rows(4, chat=True)
    config = EnsembleConfig(base_model=str(own["gpt2"]), members=2, batch_size=4, epochs=1.0)
    train_ensemble(rows, rows, config, tmp_path / "ens")
    tok, model, _ = load_ensemble(tmp_path / "ens")
    assert decoder_blocks(model.backbone) is model.backbone.h
    modules = ugda.gradient_modules(model, "heads+last_layer")
    last = model.backbone.h[-1]
    assert [type(m).__name__ for m in modules] == ["Conv1D"] * 4 + ["Linear"]
    assert all(any(m is n for n in last.modules()) for m in modules[:-1])

    batched = ugda.per_sample_grads(model, tok, rows, "heads+last_layer", batch_size=4)
    parameters = ugda.gradient_parameters(model, "heads+last_layer")
    encoder = encoder_for(model, tok)
    for i in (0, 2):
        model.zero_grad()
        seqs, _ = encoder.encode([rows[i]["prompt"]] * 2, [rows[i]["chosen"], rows[i]["rejected"]])
        ugda.pairwise_loss(model(**encoder.batch(seqs, "cpu")), 1).sum().backward()
        manual = torch.cat([p.grad.flatten() for p in parameters])
        assert manual.abs().max() > 1e-6
        assert torch.allclose(batched[i], manual, atol=1e-6, rtol=1e-4)
    candidates = [
        {
            "id": str(i),
            "prompt": r["prompt"],
            "response_a": r["chosen"],
            "response_b": r["rejected"],
        }
        for i, r in enumerate(rows)
    ]
    influence = ugda.influence_scores(tmp_path / "ens", candidates, rows, projection_dim=16)
    assert len(influence) == 4 and all(-1 - 1e-6 <= x <= 1 + 1e-6 for x in influence)
