"""The decoder flows' parts on their own: the typed inputs check-inputs passes on (each
model's tokenizer read once for every check), the measures in decoders/evaluation.py,
and an agent alone behind a real HTTP server whose malformed answers are counted."""

from __future__ import annotations

from pathlib import Path

import pytest
import transformers

from flywheel.decoders.evaluation import accuracy, agent_alone, correct, share, sweep_table
from flywheel.flows.decode import CoLLMParams, HybridParams
from flywheel.flows.decode.co_llm import CoLLMInputs, check_co_llm_inputs
from flywheel.flows.decode.common import WORLD_PROMPTS, DecodeInputs
from flywheel.flows.decode.hybrid import check_hybrid_inputs
from flywheel.flows.decode.inputs import LocalModel
from flywheel.llm import BackendSpec, make_backend
from tests.helpers.completions_server import CompletionsServer, completion


@pytest.fixture
def tokenizer_loads(monkeypatch) -> list[str]:
    """The folders whose tokenizer is read, in order (the real loading, counted)."""
    loads: list[str] = []
    real = transformers.AutoTokenizer.from_pretrained.__func__

    def counted(cls, path, *args, **kwargs):
        loads.append(str(path))
        return real(cls, path, *args, **kwargs)

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", classmethod(counted))
    return loads


def test_hybrid_check_inputs_reads_each_tokenizer_once(world_models, data_dir, tokenizer_loads):
    small, large = str(world_models / "world-small"), str(world_models / "world-large")
    params = HybridParams(small_model=small, large_model=large, world_prompts=12)
    data = check_hybrid_inputs.fn(params)
    assert sorted(tokenizer_loads) == sorted([small, large])
    assert isinstance(data, DecodeInputs) and data.prompts.name == WORLD_PROMPTS
    assert len(data.rows) == 12 and all(r["answer"] for r in data.rows)
    assert [r["source"] for r in data.rows] == data.prompts.to_pandas()["prompt"].tolist()


def test_co_llm_check_inputs_passes_its_three_datasets(world_models, data_dir, tokenizer_loads):
    base, assistant = str(world_models / "world-small"), str(world_models / "world-large")
    params = CoLLMParams(
        base_model=base,
        assistant_model=assistant,
        world_prompts=10,
        world_examples=30,
        world_validation=8,
    )
    data = check_co_llm_inputs.fn(params)
    assert sorted(tokenizer_loads) == sorted([base, assistant])
    assert isinstance(data, CoLLMInputs)
    assert 0 < data.examples.meta["num_rows"] <= 30 and 0 < data.validation.meta["num_rows"] <= 8
    # no example or validation row is one of the prompts to decode
    decoded = {r["prompt"] for r in data.rows}
    for ref in (data.examples, data.validation):
        assert not decoded & set(ref.to_pandas()["prompt"])


def test_a_missing_model_folder_is_refused_by_field(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="small_model: no model folder at .*missing"):
        LocalModel.load("small_model", str(tmp_path / "missing"))


def test_exact_match_accuracy_and_token_share():
    assert correct("aa", " aa\n") is True and correct("aa", "ab") is False
    assert correct(None, "aa") is None and correct("aa", None) is None
    # a failed completion (None) counts as wrong; any missing answer: no accuracy at all
    assert accuracy(["aa", "bb", "cc", "dd"], ["aa", None, "cc ", "x"]) == 0.5
    assert accuracy(["aa", None], ["aa", "bb"]) is None
    writers = [["base", "assistant", "base"], [], ["assistant"]]
    assert share(writers, "assistant") == 0.5 and share(writers, "other") == 0.0
    assert share([[], []], "base") == 0.0


def test_sweep_table_marks_the_chosen_eta():
    results = [
        {"eta": 0.0, "score": 0.25, "deferral_share": 1.0},
        {"eta": 0.5, "score": 0.75, "deferral_share": 0.4},
    ]
    lines = sweep_table(results, 0.5, "rouge_l").splitlines()
    assert lines[0] == "| eta | rouge_l | share deferred |"
    assert lines[2:] == ["| 0 | 0.250 | 1.000 |", "| 0.5 (chosen) | 0.750 | 0.400 |"]


def test_an_agent_alone_counts_malformed_answers_and_scores_the_rest():
    def answer(payload: dict) -> tuple[int, str]:
        if "bad" in payload["prompt"]:
            return 200, "<html>down for maintenance</html>"
        return 200, completion(payload["prompt"].split()[-1].rstrip("="))

    prompts = ["copy aa=", "copy bad=", "copy bb=", "copy cc="]
    answers = ["aa", "bad", "bb", "zz"]
    scored: list[tuple[str, str]] = []

    def reward(ps, completions):
        scored.extend(zip(ps, completions, strict=True))
        return [float(c == "aa") for c in completions]

    with CompletionsServer(answer) as server:
        spec = BackendSpec(kind="openai", model="stand-in", base_url=server.base_url)
        with make_backend(spec) as agent:
            alone = agent_alone(
                agent, "stand-in", prompts, prompts, answers, reward, max_new_tokens=4, stop=None
            )
    assert alone.failed_calls == 1
    # the malformed answer is left out of the reward and counts as wrong
    assert [p for p, _ in scored] == ["copy aa=", "copy bb=", "copy cc="]
    assert alone.mean_reward == pytest.approx(1 / 3)
    assert alone.accuracy == 0.5
