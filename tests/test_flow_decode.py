"""`decode/co-llm`, `decode/hybrid`, `decode/collab` under a real Prefect server: outputs
with who wrote each token, lineage, reuse, resuming a killed run without duplicates, and
bad input stopped before any weights load."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow as pa
import pytest
from pydantic import ValidationError
from transformers import AutoTokenizer

from flywheel.flows.decode import (
    CollabParams,
    CoLLMParams,
    HybridParams,
    co_llm_flow,
    collab_flow,
    hybrid_flow,
)
from flywheel.flows.decode import hybrid as hybrid_flow_module
from flywheel.llm import BackendSpec
from flywheel.store import (
    ModelNotRegistered,
    list_datasets,
    list_versions,
    read_dataset,
    sql,
    write_dataset,
)
from tests.helpers.completions_server import CompletionsServer, completion, top_logprobs
from tests.helpers.prefect_reads import read_artifact

pytestmark = pytest.mark.usefixtures("one_thread")


def co_llm_params(world_models: Path, **kw) -> CoLLMParams:
    defaults = dict(
        base_model=str(world_models / "world-small"),
        assistant_model=str(world_models / "world-large"),
        world_prompts=40,
        world_examples=300,
        world_validation=40,
        init_steps=20,
        steps=20,
        etas=[0.0, 0.5, 1.0],
        batch_size=16,
    )
    return CoLLMParams(**{**defaults, **kw})


def hybrid_params(world_models: Path, **kw) -> HybridParams:
    defaults = dict(
        small_model=str(world_models / "world-small"),
        large_model=str(world_models / "world-large"),
        world_prompts=30,
        batch_size=8,
    )
    return HybridParams(**{**defaults, **kw})


def world_agents(world_models: Path) -> list[BackendSpec]:
    return [BackendSpec(model=str(world_models / f"world-{s}")) for s in ("small", "large")]


def test_co_llm_flow_trains_sweeps_decodes_and_reuses(prefect_api, world_models, data_dir):
    out = co_llm_flow(co_llm_params(world_models))
    figures = out["figures"]
    rows = read_dataset("decoded_co_llm").to_pandas()
    assert len(rows) == 40 and rows["id"].is_unique
    for writers, ids, share in zip(
        rows["writers"], rows["token_ids"], rows["deferral_share"], strict=False
    ):
        assert set(writers) <= {"base", "assistant"} and len(writers) == len(ids)
        assert share == pytest.approx(list(writers).count("assistant") / len(writers))
    assert figures["accuracy"] == pytest.approx(rows["correct"].mean())

    sweep = read_dataset("co_llm_eta_sweep").to_pandas()
    assert sorted(sweep["eta"]) == [0.0, 0.5, 1.0]
    assert sweep["recommended"].sum() == 1
    assert figures["eta"] == float(sweep[sweep["recommended"]]["eta"].iloc[0])
    by_eta = sweep.set_index("eta")["deferral_share"]
    assert by_eta[0.0] == 1.0 and by_eta[1.0] == 0.0
    assert "base alone accuracy" in figures and "assistant alone accuracy" in figures

    lineage = sql("select dataset, input_dataset from lineage").values.tolist()
    for edge in (
        ["decoded_co_llm", "world_decode_prompts"],
        ["decoded_co_llm", "co-llm"],
        ["co-llm", "world_co_llm_examples"],
        ["co-llm", "world-small"],
        ["co-llm", "world-large"],
        ["co_llm_eta_sweep", "co-llm"],
    ):
        assert edge in lineage, edge
    assert "eta sweep on world_co_llm_validation" in read_artifact("decode-co-llm")
    # the assistant's target log-probs are stored once, keyed by its weights
    assert len(list((data_dir / "_work" / "co-llm-targets").glob("*.pt"))) == 1

    again = co_llm_flow(co_llm_params(world_models))["figures"]
    assert again["reused earlier model"] is True and again["reused earlier output"] is True
    assert list_versions("decoded_co_llm") == [figures["output"].split("@")[1]]

    fixed = co_llm_flow(co_llm_params(world_models, eta=0.0, output="all_deferred"))["figures"]
    assert fixed["eta"] == 0.0 and fixed["share of tokens deferred"] == 1.0
    assert fixed["accuracy"] == pytest.approx(figures["assistant alone accuracy"])


def test_hybrid_flow_reports_share_sent_and_its_extremes(prefect_api, world_models, data_dir):
    never = hybrid_flow(hybrid_params(world_models, measure="max_prob", threshold=0.0))
    assert never["figures"]["share of tokens sent to the large model"] == 0.0
    assert never["figures"]["accuracy"] == never["figures"]["small alone accuracy"]
    always = hybrid_flow(
        hybrid_params(world_models, measure="max_prob", threshold=1.0, output="all_large")
    )
    assert always["figures"]["share of tokens sent to the large model"] == 1.0
    assert always["figures"]["accuracy"] == always["figures"]["large alone accuracy"]

    middle = hybrid_flow(hybrid_params(world_models, threshold=0.5, output="gated"))["figures"]
    rows = read_dataset("gated").to_pandas()
    sent = sum(list(w).count("large") for w in rows["writers"])
    total = sum(len(w) for w in rows["writers"])
    assert middle["share of tokens sent to the large model"] == pytest.approx(sent / total)
    lineage = sql("select dataset, input_dataset from lineage").values.tolist()
    assert ["gated", "world-large"] in lineage and ["gated", "world_decode_prompts"] in lineage


def test_collab_flow_records_agents_rewards_and_calls(prefect_api, world_models, data_dir):
    params = CollabParams(
        agents=world_agents(world_models),
        reward_model="world",
        world_prompts=12,
        k=2,
        rollout_len=10,
        batch_size=6,
    )
    figures = collab_flow(params)["figures"]
    rows = read_dataset("decoded_collab").to_pandas()
    assert len(rows) == 12 and (rows["finish_reason"] != "failed").all()
    for writers, tokens in zip(rows["writers"], rows["tokens"], strict=False):
        assert set(writers) <= {"world-small", "world-large"} and len(writers) == len(tokens)
    # with the world's checker as the target reward, the reward is the accuracy
    assert figures["mean target reward"] == pytest.approx(figures["accuracy"])
    assert (rows["model_calls"] > 0).all() and (rows["failed_calls"] == 0).all()
    assert "world-large alone: accuracy" in figures

    with pytest.raises(ModelNotRegistered, match="no registered model 'nope'"):
        collab_flow(params.model_copy(update={"reward_model": "nope"}))


def test_collab_flow_keeps_failed_calls_with_their_raw_text(prefect_api, world_models, data_dir):
    # an agent behind a server that is not there: every call fails, and each failure is
    # written with its error; the prompts are kept as failed rows, not dropped
    dead = BackendSpec(
        kind="openai", model="ghost", base_url="http://127.0.0.1:9/v1", max_retries=0, timeout=2
    )
    params = CollabParams(
        agents=[dead], reward_model="world", world_prompts=3, k=2, baselines=False
    )
    figures = collab_flow(params)["figures"]
    rows = read_dataset("decoded_collab").to_pandas()
    assert len(rows) == 3 and (rows["finish_reason"] == "failed").all()
    assert rows["completion"].isna().all() and rows["reward"].isna().all()
    failures = json.loads(rows["failures"].iloc[0])
    assert failures and failures[0]["stage"] == "topk" and failures[0]["error"]
    assert figures["prompts failed"] == 3


def test_a_killed_decoding_resumes_without_losing_or_duplicating_rows(
    prefect_api, world_models, data_dir, monkeypatch
):
    real = hybrid_flow_module.hybrid_decode
    calls = []

    def dies_on_the_third_chunk(*args, **kwargs):
        calls.append(len(args[2]))
        if len(calls) == 3:
            raise KeyboardInterrupt("killed")  # like a SIGINT halfway
        return real(*args, **kwargs)

    monkeypatch.setattr(hybrid_flow_module, "hybrid_decode", dies_on_the_third_chunk)
    params = hybrid_params(world_models, world_prompts=30, batch_size=8, baselines=False)
    with pytest.raises(BaseException, match="killed"):
        hybrid_flow(params)
    assert "decoded_hybrid" not in list_datasets()
    counting = lambda *a, **k: calls.append(0) or real(*a, **k)  # noqa: E731
    monkeypatch.setattr(hybrid_flow_module, "hybrid_decode", counting)
    hybrid_flow(params)
    # chunks 1-2 were kept; chunks 3-4 (8 + 6 prompts) were decoded on the re-run
    assert calls == [8, 8, 8, 0, 0]
    rows = read_dataset("decoded_hybrid").to_pandas()
    assert len(rows) == 30 and rows["id"].is_unique


def test_bad_input_fails_before_decoding(prefect_api, world_models, data_dir, tmp_path):
    # a model whose tokenizer has one more token
    other = tmp_path / "other-large"
    shutil.copytree(world_models / "world-large", other)
    tok = AutoTokenizer.from_pretrained(str(other))
    tok.add_tokens(["@@"])
    tok.save_pretrained(str(other))
    with pytest.raises(ValueError, match="do not share a tokenizer.*vocabularies differ"):
        co_llm_flow(co_llm_params(world_models, assistant_model=str(other)))
    with pytest.raises(ValueError, match="small_model .* and large_model .* do not share"):
        hybrid_flow(hybrid_params(world_models, large_model=str(other)))
    assert not (data_dir / "_models").exists()  # nothing was trained

    with pytest.raises(ValidationError, match="eta"):
        co_llm_params(world_models, eta=1.5)
    with pytest.raises(ValidationError, match="eta must be a number in"):
        co_llm_params(world_models, etas=[0.5, -0.1])
    with pytest.raises(ValidationError, match="threshold must be in \\[0, 1\\] for measure"):
        hybrid_params(world_models, measure="max_prob", threshold=2.0)

    write_dataset("other_columns", [{"text": "copy abc="}])
    with pytest.raises(ValueError, match="no prompt column 'prompt'.*'text'"):
        hybrid_flow(hybrid_params(world_models, prompts="other_columns"))
    write_dataset("empty_prompts", [], schema=pa.schema([("prompt", pa.string())]))
    for flow, params in (
        (hybrid_flow, hybrid_params(world_models, prompts="empty_prompts")),
        (
            co_llm_flow,
            co_llm_params(
                world_models, prompts="empty_prompts", train_dataset="empty_prompts", eta=0.5
            ),
        ),
        (collab_flow, CollabParams(agents=world_agents(world_models), prompts="empty_prompts")),
    ):
        with pytest.raises(ValueError, match="empty_prompts@.* has no prompts"):
            flow(params)
    with pytest.raises(FileNotFoundError, match="base_model: no model folder"):
        co_llm_flow(co_llm_params(world_models, base_model=str(tmp_path / "missing")))


def test_collab_flow_writes_each_prompts_own_failed_calls(prefect_api, data_dir):
    """An HTTP agent whose server answers some prompts' top-k requests with a malformed
    body: those rows carry their own failure and raw reply, the others carry none."""

    def answer(payload: dict) -> tuple[int, str]:
        if "bad" in payload["prompt"]:
            return 200, f"<html>no completion for {payload['prompt']!r}</html>"
        if "logprobs" in payload:
            return 200, top_logprobs({"a": -0.1, "b": -2.0})
        return 200, completion("b")

    prompts = ["copy aa=", "copy bad=", "sort aa=", "reverse bad="]
    write_dataset("http_prompts", [{"prompt": p, "answer": "aa"} for p in prompts])
    with CompletionsServer(answer) as server:
        agent = BackendSpec(kind="openai", model="stand-in", base_url=server.base_url)
        params = CollabParams(
            agents=[agent],
            prompts="http_prompts",
            reward_model="world",
            k=2,
            rollout_len=1,
            max_new_tokens=2,
            baselines=True,
        )
        figures = collab_flow(params)["figures"]
    # the agent alone on the same prompts: the malformed answers are counted, not fatal
    [alone_failed] = [v for k, v in figures.items() if k.endswith("alone: failed calls")]
    assert alone_failed == 2
    rows = read_dataset("decoded_collab").to_pandas().set_index("prompt")
    for prompt in ("copy aa=", "sort aa="):
        assert json.loads(rows.loc[prompt, "failures"]) == []
        assert rows.loc[prompt, "completion"] == "aa" and rows.loc[prompt, "failed_calls"] == 0
    for prompt in ("copy bad=", "reverse bad="):
        [failure] = json.loads(rows.loc[prompt, "failures"])
        assert (failure["stage"], failure["step"]) == ("topk", 0)
        assert failure["raw"] == f"<html>no completion for {prompt!r}</html>"
        assert rows.loc[prompt, "finish_reason"] == "failed"
    assert (figures["prompts failed"], figures["failed model calls"]) == (2, 2)
