"""Labelers: the world oracle, an LLM judge (scripted and a real tiny model), and the
human queue with its labeled-file checks."""

from __future__ import annotations

import json
import random
import re
from collections.abc import Sequence

import pandas as pd
import pytest

from flywheel.llm.base import Backend, TokenLogprob
from flywheel.reward_models.labelers import (
    LabelFileError,
    LLMJudgeLabeler,
    parse_choice,
    read_labels,
    write_queue,
)
from flywheel.store import read_dataset
from flywheel.world.labelers import WorldOracleLabeler
from flywheel.world.tasks import Task, sample_tasks


def pair(i: int, prompt: str, a: str, b: str) -> dict:
    return {"id": f"p{i}", "prompt": prompt, "response_a": a, "response_b": b}


def world_pairs(n: int, seed: int) -> list[dict]:
    """Each task's correct answer against a wrong one, in a random order."""
    rng = random.Random(seed)
    out = []
    for i, task in enumerate(sample_tasks(n, rng)):
        wrong = task.answer + "z"
        a, b = (task.answer, wrong) if rng.random() < 0.5 else (wrong, task.answer)
        out.append(pair(i, task.prompt, a, b))
    return out


class ScriptedJudge(Backend):
    """Answers each judge prompt with `answer(shown_first, shown_second)`."""

    model = "scripted-judge"

    def __init__(self, answer) -> None:
        self.answer = answer
        self.prompts: list[str] = []

    def generate(self, prompts: Sequence[str], **kwargs) -> list[str]:
        self.prompts += prompts
        out = []
        for p in prompts:
            first = re.search(r"^Response A: (.*)$", p, re.M).group(1)
            second = re.search(r"^Response B: (.*)$", p, re.M).group(1)
            request = re.search(r"^Request: (.*)$", p, re.M).group(1)
            out.append(self.answer(request, first, second))
        return out

    def score(self, prompts, completions) -> list[list[float]]:
        raise NotImplementedError

    def next_token_topk(self, prefixes, k: int = 5) -> list[list[TokenLogprob]]:
        raise NotImplementedError


def test_oracle_prefers_the_correct_answer_then_the_nearer_miss() -> None:
    sort = Task("sort", "dcba")  # answer abcd
    pairs = [
        pair(0, sort.prompt, "abcd", "abdc"),  # correct vs wrong
        pair(1, sort.prompt, "zzzz", "abce"),  # two wrong: the near miss wins
        pair(2, sort.prompt, "abce", "abcf"),  # two wrong, equally near: a tie
        pair(3, "copy ab=\nsort dcba=", "dcba", "abcd"),  # one-shot prompt: the last line
        pair(4, "tell me a joke", "a", "b"),  # not a world task
    ]
    labeled, failures = WorldOracleLabeler().label(pairs)
    assert [(r["id"], r["label"], r["chosen"]) for r in labeled] == [
        ("p0", "a", "abcd"),
        ("p1", "b", "abce"),
        ("p3", "b", "abcd"),
    ]
    assert all(r["labeler"] == "world-oracle" and r["prompt"] for r in labeled)
    assert {f["id"]: f["error"].split(":")[0] for f in failures} == {
        "p2": "tie",
        "p4": "not a world task",
    }
    assert all(f["raw"] for f in failures)

    strict, ties = WorldOracleLabeler(tie_break="none").label(pairs[:3])
    assert [r["id"] for r in strict] == ["p0"] and [f["id"] for f in ties] == ["p1", "p2"]
    # a margin: near grades are not a preference, but right always beats wrong
    margin, close = WorldOracleLabeler(min_margin=0.3).label(
        [
            pair(0, sort.prompt, "abce", "abxy"),
            pair(1, sort.prompt, "abcd", "abce"),
            pair(2, sort.prompt, "abce", "zzzz"),
        ]
    )
    assert [r["id"] for r in margin] == ["p1", "p2"] and [f["id"] for f in close] == ["p0"]

    many = world_pairs(50, 0)
    labeled, failures = WorldOracleLabeler().label(many)
    assert not failures and len(labeled) == 50
    for row, p in zip(labeled, many, strict=True):
        assert row["chosen"] == Task(*p["prompt"][:-1].split(" ")).answer


def test_judge_answers_parse_and_map_back_through_the_random_order() -> None:
    assert [parse_choice(t) for t in ["A", " b.", "Response B", "(a) since", "Answer: A"]] == [
        "A",
        "B",
        "B",
        "A",
        "A",
    ]
    assert [parse_choice(t) for t in ["abc", "", "both", "neither", "1"]] == [None] * 5

    pairs = world_pairs(40, 1)
    oracle, _ = WorldOracleLabeler().label(pairs)

    def fair(request: str, first: str, second: str) -> str:
        task = Task(*request[:-1].split(" "))
        return "A" if first == task.answer else "B"

    judge = LLMJudgeLabeler(ScriptedJudge(fair), seed=3)
    labeled, failures = judge.label(pairs)
    assert not failures
    assert [r["label"] for r in labeled] == [r["label"] for r in oracle]
    assert labeled[0]["labeler"] == "judge:scripted-judge"
    swaps = [judge.swapped(p["id"]) for p in pairs]
    assert 0 < sum(swaps) < len(pairs)  # both orders are shown
    assert swaps == [LLMJudgeLabeler(ScriptedJudge(fair), seed=3).swapped(p["id"]) for p in pairs]

    # a judge that always says "A" picks the first shown: the random order spreads it
    biased, _ = LLMJudgeLabeler(ScriptedJudge(lambda *_: "A"), seed=3).label(pairs)
    assert [r["label"] for r in biased] == ["b" if s else "a" for s in swaps]


def test_judge_answers_that_do_not_parse_are_kept_with_their_raw_text() -> None:
    pairs = world_pairs(4, 2)
    answers = iter(["A", "I cannot tell", "", "b"])
    labeled, failures = LLMJudgeLabeler(ScriptedJudge(lambda *_: next(answers))).label(pairs)
    assert [r["id"] for r in labeled] == ["p0", "p3"]
    assert [(f["id"], f["raw"], f["error"]) for f in failures] == [
        ("p1", "I cannot tell", "unparsed: no A/B choice"),
        ("p2", "", "unparsed: the judge returned no text"),
    ]
    for f in failures:
        assert f["prompt"] == pairs[int(f["id"][1:])]["prompt"]
        assert f["response_a"] and f["response_b"] and f["labeler"] == "judge:scripted-judge"


def test_a_real_tiny_model_judge_runs_end_to_end(world_models) -> None:
    import torch

    from flywheel.llm import TransformersBackend

    pairs = world_pairs(12, 3)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # much faster than two threads on 2 busy cores
    try:
        with TransformersBackend(world_models / "world-small") as backend:
            labeled, failures = LLMJudgeLabeler(backend).label(pairs)
    finally:
        torch.set_num_threads(threads)
    # a 0.1M-parameter string model mostly does not answer A or B; nothing is lost
    assert len(labeled) + len(failures) == len(pairs)
    assert sorted(r["id"] for r in labeled + failures) == sorted(p["id"] for p in pairs)
    assert failures, "expected the tiny model to fail to answer A/B at least once"
    for f in failures:
        assert isinstance(f["raw"], str) and f["error"].startswith("unparsed:")
        assert f["prompt"] and f["labeler"].startswith("judge:")


@pytest.fixture
def queue(data_dir):
    pairs = world_pairs(6, 4)
    return pairs, write_queue(pairs, "ugda_queue")


def test_queue_is_a_store_dataset_with_an_empty_label_column(queue) -> None:
    pairs, ref = queue
    assert read_dataset("ugda_queue").version == ref.version
    table = ref.to_arrow()
    assert table.column_names == [
        "id",
        "prompt",
        "response_a",
        "response_b",
        "label",
        "queue_version",
    ]
    rows = table.to_pylist()
    assert [r["id"] for r in rows] == [p["id"] for p in pairs]
    assert all(r["label"] is None and r["queue_version"] == ref.version for r in rows)
    help_text = table.schema.metadata[b"labeling"].decode()
    assert "a" in help_text and "read_labels" in help_text
    assert table.schema.field("label").metadata[b"description"].decode() == help_text
    with pytest.raises(ValueError, match="appears more than once"):
        write_queue([pairs[0], pairs[0]], "ugda_queue")


def test_labeled_files_in_each_format_and_partial_labels(queue, tmp_path) -> None:
    pairs, ref = queue
    frame = ref.to_pandas()
    frame["label"] = ["A", "b", " a ", "", None, "B"]
    csv = tmp_path / "labels.csv"
    frame.to_csv(csv, index=False)
    rows, unlabeled = read_labels(csv, ref)
    assert [(r["id"], r["label"]) for r in rows] == [
        ("p0", "a"),
        ("p1", "b"),
        ("p2", "a"),
        ("p5", "b"),
    ]
    assert (
        rows[1]["chosen"] == pairs[1]["response_b"]
        and rows[1]["rejected"] == pairs[1]["response_a"]
    )
    assert rows[0]["labeler"] == "human:labels.csv"
    assert [p["id"] for p in unlabeled] == ["p3", "p4"]

    jsonl = tmp_path / "labels.jsonl"
    jsonl.write_text(
        "".join(json.dumps({"id": i, "label": lab}) + "\n" for i, lab in [("p4", "a"), ("p0", "B")])
    )
    rows, unlabeled = read_labels(jsonl, ref)
    assert [(r["id"], r["label"]) for r in rows] == [("p4", "a"), ("p0", "b")]
    assert len(unlabeled) == 4

    parquet = tmp_path / "labels.parquet"
    frame[["id", "label"]].fillna("").to_parquet(parquet)
    assert len(read_labels(parquet, ref)[0]) == 4


@pytest.mark.parametrize(
    "labels, message",
    [
        (pd.DataFrame({"id": ["p0"], "answer": ["a"]}), r"column\(s\) \['label'\] missing"),
        (pd.DataFrame({"label": ["a"]}), r"column\(s\) \['id'\] missing"),
        (
            pd.DataFrame({"id": ["p0", "zz9"], "label": ["a", "b"]}),
            r"1 id\(s\) are not in queue ugda_queue/.*'zz9'",
        ),
        (
            pd.DataFrame({"id": ["p0", "p1", "p0"], "label": ["a", "b", "a"]}),
            r"1 id\(s\) appear more than once, e.g. 'p0'",
        ),
        (
            pd.DataFrame({"id": ["p0"], "label": ["a"], "queue_version": ["v_other"]}),
            r"answers queue version\(s\) \['v_other'\], not v",
        ),
    ],
)
def test_labeled_files_are_rejected_with_the_reason(queue, tmp_path, labels, message) -> None:
    _, ref = queue
    path = tmp_path / "labels.csv"
    labels.to_csv(path, index=False)
    with pytest.raises(LabelFileError, match=message):
        read_labels(path, ref)


def test_labels_outside_a_b_are_kept_out_and_reported(queue, tmp_path, caplog) -> None:
    _, ref = queue
    path = tmp_path / "labels.csv"
    pd.DataFrame({"id": ["p0", "p1", "p2"], "label": ["a", "tie", "C"]}).to_csv(path, index=False)
    rows, not_used = read_labels(path, ref)
    assert [r["id"] for r in rows] == ["p0"]
    reasons = {p["id"]: p["reason"] for p in not_used}
    assert reasons["p1"] == "label 'tie' is not a or b"
    assert reasons["p2"] == "label 'c' is not a or b"
    assert "2 label(s) are not a or b and are kept out of training, e.g. id 'p1'" in caplog.text


def test_unreadable_label_files_are_rejected(queue, tmp_path) -> None:
    _, ref = queue
    with pytest.raises(LabelFileError, match="no such file"):
        read_labels(tmp_path / "missing.csv", ref)
    xlsx = tmp_path / "labels.xlsx"
    xlsx.write_text("x")
    with pytest.raises(LabelFileError, match=r"unsupported file type \.xlsx"):
        read_labels(xlsx, ref)
    broken = tmp_path / "labels.jsonl"
    broken.write_text("{not json\n")
    with pytest.raises(LabelFileError, match="could not be read as jsonl"):
        read_labels(broken, ref)
