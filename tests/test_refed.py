"""REFED method tests: feedback once per reference, one-shot responses, refinement,
filters, and failures kept with their raw text."""

from __future__ import annotations

import json
import random
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import pytest

from flywheel.flows.synth import WorldRefedConfig
from flywheel.llm import (
    Backend,
    BackendError,
    BackendSpec,
    OpenAIBackend,
    TokenLogprob,
    make_backend,
)
from flywheel.synthesis.refed import (
    LLMTeacher,
    RefedConfig,
    RefedRun,
    SeedDataError,
    make_teacher,
    references_from_rows,
)
from flywheel.synthesis.rouge import diverse_subset, rouge_l
from flywheel.world.tasks import check, sample_tasks
from flywheel.world.teacher import WorldTeacher
from tests.helpers.completions_server import CompletionsServer, completion
from tests.helpers.holding_server import Holding


def world_refs(n: int, seed: int = 1):
    return references_from_rows([t.as_row() for t in sample_tasks(n, random.Random(seed))], "w")


class CountingTeacher(WorldTeacher):
    """The world teacher, counting feedback requests per reference."""

    def __init__(self) -> None:
        super().__init__(seed=0)
        self.feedback_requests: Counter = Counter()

    def instruction_feedback(self, references, attempt=0):
        self.feedback_requests.update(r["id"] for r in references)
        return super().instruction_feedback(references, attempt)

    def response_feedback(self, references, attempt=0):
        self.feedback_requests.update(r["id"] for r in references)
        return super().response_feedback(references, attempt)


class ScriptedBackend(Backend):
    """Answers generate() from a function of the prompt; records prompts (unit tests only)."""

    def __init__(self, answer) -> None:
        self.model = "scripted"
        self.answer = answer
        self.prompts: list[str] = []

    def generate(self, prompts: Sequence[str], **kw) -> list[str]:
        self.prompts += prompts
        return [self.answer(p) for p in prompts]

    def score(self, prompts, completions) -> list[list[float]]:
        raise NotImplementedError

    def next_token_topk(self, prefixes, k=5) -> list[list[TokenLogprob]]:
        raise NotImplementedError


def config(world_models: Path, **kw) -> RefedConfig:
    responder = BackendSpec(model=str(world_models / "world-large"))
    return WorldRefedConfig(responder=responder, **{"chunk_size": 16, **kw})


def test_rouge_l() -> None:
    assert rouge_l("a b c d", "a b c d") == 1.0
    assert rouge_l("a b c d", "e f") == 0.0
    assert rouge_l("the cat sat", "the cat ran") == pytest.approx(2 / 3)
    assert diverse_subset(["a b", "a b", "c d", "a b c"], 0.7) == [True, False, True, False]
    assert diverse_subset(["x y"], 0.7, seen=["x y"]) == [False]


def test_feedback_once_per_reference_reused_for_all_samples(world_models, tmp_path) -> None:
    refs = world_refs(12)
    teacher = CountingTeacher()
    cfg = config(world_models, samples_per_feature=6)
    run = RefedRun(refs, cfg, tmp_path, teacher, lambda: make_backend(cfg.responder))
    rows, failed, stats = run.result()
    # the tiny responder may answer a prompt with nothing: kept as a failure, not a sample
    assert all((f["stage"], f["error"]) == ("responses", "empty response") for f in failed)
    assert (
        stats["responses"] + len(failed)
        == stats["instructions_proposed"] - stats["dropped_by_diversity"]
    )
    # exactly one instruction- and one response-feedback request per reference
    assert teacher.feedback_requests == Counter({r.id: 2 for r in refs})
    per_ref = Counter(r["reference_id"] for r in rows)
    assert min(per_ref.values()) >= 6
    assert stats["feedback_requests_per_sample"] == pytest.approx(2 * len(refs) / len(rows))
    assert stats["feedback_requests_per_sample"] < 0.2
    # refined answers follow the response feedback: every kept answer is correct
    assert all(check(r["instruction"], r["response"]) == 1.0 for r in rows)
    assert stats["refined_changed"] == sum(r["refined"] for r in rows)
    assert len({r["id"] for r in rows}) == len(rows)


def test_responses_use_the_reference_as_one_shot_example(tmp_path) -> None:
    refs = world_refs(3)
    responder = ScriptedBackend(lambda p: "zz")
    cfg = WorldRefedConfig(responder=BackendSpec(model="unused"), samples_per_feature=2)
    rows, _, stats = RefedRun(refs, cfg, tmp_path, WorldTeacher(), lambda: responder).result()
    by_id = {r.id: r for r in refs}
    for row in rows:
        ref = by_id[row["reference_id"]]
        prompt = f"{ref.instruction}={ref.response}\n{row['instruction']}="
        assert prompt in responder.prompts
        assert row["initial_response"] == "zz" and row["refined"]  # refinement fixed it
    assert stats["refined_changed"] == len(rows)


def test_diversity_filter_drops_near_duplicates(tmp_path) -> None:
    class Repetitive(WorldTeacher):
        def new_instructions(self, requests, n, attempt=0):
            return [{"instructions": ["copy abc"] * n} for _ in requests]

    refs = world_refs(2)
    responder = ScriptedBackend(lambda p: "abc")
    cfg = WorldRefedConfig(responder=BackendSpec(model="unused"), samples_per_feature=4)
    rows, _, stats = RefedRun(refs, cfg, tmp_path, Repetitive(), lambda: responder).result()
    assert [r["instruction"] for r in rows] == ["copy abc"]
    assert stats["dropped_by_diversity"] == stats["instructions_proposed"] - 1


def test_judge_filter_drops_low_scores(tmp_path) -> None:
    class NoRefine(WorldTeacher):
        def refine(self, requests, attempt=0):
            return [{"response": resp} for *_, resp in requests]

    refs = world_refs(4)
    responder = ScriptedBackend(lambda p: "abc")  # right only for `copy abc`-like tasks
    cfg = WorldRefedConfig(responder=BackendSpec(model="unused"), judge_filter=True)
    rows, _, stats = RefedRun(refs, cfg, tmp_path, NoRefine(), lambda: responder).result()
    assert stats["dropped_by_judge"] > 0
    assert all(r["judge_score"] >= 7 for r in rows)


def test_llm_teacher_json_is_validated_and_failures_keep_raw_text(tmp_path) -> None:
    """An LLM teacher whose answers parse for some references and never for others."""
    good_feedback = '{"subject_areas": ["copy"], "skills": ["transcription"]}'

    def answer(prompt: str) -> str:
        if "List the subject areas" in prompt:
            return "sure! no json here" if "reverse" in prompt else "ok: " + good_feedback
        if "what makes it good" in prompt:
            return json.dumps(
                {
                    "content_quality": "exact",
                    "communication": "bare",
                    "instruction_alignment": "all",
                }
            )
        if "new, different instructions" in prompt:
            return '{"instructions": ["copy xy", "copy yz"]}'
        if "Improve the response" in prompt:
            return '{"response": "fixed"}'
        raise AssertionError(prompt)

    backend = ScriptedBackend(answer)
    refs = references_from_rows(
        [
            {"instruction": "copy ab", "response": "ab"},
            {"instruction": "reverse ab", "response": "ba"},
        ],
        "seed",
    )
    cfg = RefedConfig(
        responder=BackendSpec(model="unused"),
        teacher="llm",
        teacher_backend=BackendSpec(model="unused"),
        samples_per_feature=2,
        max_attempts=3,
    )
    run = RefedRun(refs, cfg, tmp_path, LLMTeacher(backend), lambda: ScriptedBackend(lambda p: "q"))
    rows, failed, stats = run.result()
    assert {r["instruction"] for r in rows} == {"copy xy", "copy yz"}
    assert all(r["response"] == "fixed" for r in rows)
    [failure] = failed
    assert failure["stage"] == "instruction_feedback"
    assert failure["raw"] == "sure! no json here"
    assert "no JSON object" in failure["error"] and failure["attempts"] == 3
    # asked three times for the bad reference, once for the good one
    asked = [p for p in backend.prompts if "List the subject areas" in p]
    assert sum("reverse ab" in p for p in asked) == 3 and len(asked) == 4


def test_llm_teacher_on_a_real_tiny_model_records_unparseable_answers(
    world_models, tmp_path
) -> None:
    """A real (tiny, untrained for JSON) model as teacher: nothing parses, all is kept."""
    spec = BackendSpec(model=str(world_models / "world-small"))
    cfg = RefedConfig(
        responder=spec, teacher="llm", teacher_backend=spec, max_attempts=2, samples_per_feature=2
    )
    with make_backend(spec) as backend:
        teacher = LLMTeacher(backend, max_new_tokens=24)
        refs = world_refs(3)
        run = RefedRun(refs, cfg, tmp_path, teacher, lambda: make_backend(spec))
        rows, failed, stats = run.result()
    # both feedback requests fail for every reference: one row each
    assert rows == [] and len(failed) == 6
    assert Counter((f["stage"], f["reference_id"]) for f in failed) == {
        (stage, r.id): 1 for stage in ("instruction_feedback", "response_feedback") for r in refs
    }
    assert all(f["raw"] != "" or "no JSON" in f["error"] for f in failed)
    assert stats["references_with_feedback"] == 0


def test_responder_outage_keeps_done_chunks_and_resumes(tmp_path) -> None:
    """A server that goes away mid-stage: the error propagates, finished chunks stay,
    the next run asks only for the rest; no row is lost or turned into an empty value."""
    calls = []

    class Flaky(ScriptedBackend):
        def generate(self, prompts, **kw):
            calls.append(len(prompts))
            if len(calls) == 2:
                raise BackendError("server said 503", raw='{"error": "overloaded"}')
            return super().generate(prompts, **kw)

    cfg = WorldRefedConfig(
        responder=BackendSpec(model="unused"), samples_per_feature=4, chunk_size=8
    )
    responder = Flaky(lambda p: "x")
    run = RefedRun(world_refs(4), cfg, tmp_path, WorldTeacher(), lambda: responder)
    with pytest.raises(BackendError, match="503"):
        run.result()
    assert len(list((tmp_path / "responses").glob("chunk-*.json"))) == 1
    rows, failed, stats = run.result()  # the server is back
    assert (
        not failed and len(rows) == stats["instructions_proposed"] - stats["dropped_by_diversity"]
    )
    assert sum(calls[2:]) == len(rows) - calls[0]  # only the missing chunks were asked again


def test_duplicate_reference_ids_are_rejected() -> None:
    rows = [{"instruction": "copy ab", "response": "ab"}] * 2
    with pytest.raises(SeedDataError, match="occur more than once"):
        references_from_rows(rows, "seed")
    ok = references_from_rows([{"id": 0, **rows[0]}, {"id": 1, **rows[1]}], "seed")
    assert [r.id for r in ok] == ["0", "1"]


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ([{"instruction": "copy ab"}], "column 'response' is missing"),
        ([{"instruction": "copy ab", "response": "  "}], "row 0: 'response' is empty"),
        ([{"instruction": 3, "response": "ab"}], "row 0: 'instruction' must be text, got int"),
        ([], "no rows"),
    ],
)
def test_bad_seed_rows_name_the_field(rows, message) -> None:
    with pytest.raises(SeedDataError, match=message):
        references_from_rows(rows, "dataset seeds")


def test_config_errors_name_the_field() -> None:
    with pytest.raises(ValueError, match="teacher_backend is required"):
        RefedConfig(responder=BackendSpec(model="x"), teacher="llm")
    with pytest.raises(ValueError, match="samples_per_feature"):
        RefedConfig(responder=BackendSpec(model="x"), samples_per_feature=0)


def test_response_template_and_stop_are_configurable(tmp_path) -> None:
    """A user's seed data in natural language gets a readable one-shot prompt."""
    refs = references_from_rows([{"instruction": "copy abc", "response": "abc"}], "seed")
    responder = ScriptedBackend(lambda p: "abc")
    template = "Example:\nQ: {example_instruction}\nA: {example_response}\n\nQ: {instruction}\nA:"
    cfg = WorldRefedConfig(
        responder=BackendSpec(model="unused"),
        samples_per_feature=1,
        response_template=template,
        response_stop=["\nQ:"],
    )
    rows, _, _ = RefedRun(refs, cfg, tmp_path, WorldTeacher(), lambda: responder).result()
    assert rows
    assert all(p.startswith("Example:\nQ: copy abc\nA: abc\n\nQ: ") for p in responder.prompts)
    with pytest.raises(ValueError, match="response_template must contain"):
        RefedConfig(responder=BackendSpec(model="x"), response_template="{example_instruction}")


# --- failures: one row per failed request, each with its own raw text ---


def test_both_feedback_failures_are_kept_one_row_each(tmp_path) -> None:
    """The world teacher refuses a reference that is not a world task, for instruction
    feedback and for response feedback alike: both refusals are kept."""
    refs = references_from_rows(
        [
            {"id": "task", "instruction": "copy abc", "response": "abc"},
            {"id": "prose", "instruction": "Write a haiku about rain", "response": "..."},
        ],
        "seed",
    )
    responder = ScriptedBackend(lambda p: "abc")
    cfg = WorldRefedConfig(responder=BackendSpec(model="unused"), samples_per_feature=2)
    run = RefedRun(refs, cfg, tmp_path, WorldTeacher(), lambda: responder)
    rows, failed, stats = run.result()
    assert rows and {r["reference_id"] for r in rows} == {"task"}
    assert sorted((f["stage"], f["reference_id"]) for f in failed) == [
        ("instruction_feedback", "prose"),
        ("response_feedback", "prose"),
    ]
    assert all("Write a haiku about rain" in f["raw"] for f in failed)
    assert all(f["attempts"] == cfg.max_attempts for f in failed)
    assert stats["failed"] == 2 and stats["references_with_feedback"] == 1
    [bad] = [fb for fb in run.feedback() if fb["reference_id"] == "prose"]
    assert len(bad["failures"]) == 2 and "subject_areas" not in bad


def test_an_empty_response_is_a_failure_not_a_sample(tmp_path) -> None:
    refs = world_refs(6, seed=2)
    blank = {"copy": "", "sort": " \n "}  # nothing, and only whitespace
    responder = ScriptedBackend(lambda p: blank.get(p.rsplit("\n", 1)[-1].split()[0], "abc"))
    cfg = WorldRefedConfig(responder=BackendSpec(model="unused"), samples_per_feature=3)
    run = RefedRun(refs, cfg, tmp_path, WorldTeacher(), lambda: responder)
    rows, failed, stats = run.result()
    kept = {c["id"]: c for c in run.instructions() if c["kept"]}
    blanks = {i for i, c in kept.items() if c["instruction"].split()[0] in blank}
    assert blanks and rows, "the references must give both kinds"
    assert {f["item_id"] for f in failed} == blanks and len(failed) == len(blanks)
    for f in failed:
        family = kept[f["item_id"]]["instruction"].split()[0]
        assert (f["stage"], f["raw"], f["error"]) == ("responses", blank[family], "empty response")
    assert not {r["id"] for r in rows} & blanks
    assert all(r["initial_response"] for r in rows)


def responder_answer(payload: dict) -> tuple[int, str]:
    """A responder behind HTTP: a malformed body for `reverse` tasks, blanks for `copy`
    tasks, an answer for the others; the new instruction is the prompt's last line."""
    instruction = payload["prompt"].rsplit("\n", 1)[-1].removesuffix("=")
    if instruction.startswith("reverse"):
        return 200, f"<html>upstream busy while answering {instruction!r}</html>"
    if instruction.startswith("copy"):
        return 200, completion("  \t")
    return 200, completion("abc")


def test_malformed_and_empty_responder_answers_are_failures_with_raw_text(tmp_path) -> None:
    """REFED end to end with an HTTP responder that answers some prompts with a malformed
    body and others with blanks: each such item is one failure row with its own raw text,
    and the other items become samples (the batch is not sunk)."""
    cfg = WorldRefedConfig(
        responder=BackendSpec(model="unused"), samples_per_feature=3, chunk_size=8
    )
    with CompletionsServer(responder_answer) as server:
        run = RefedRun(
            world_refs(8, seed=3),
            cfg,
            tmp_path,
            WorldTeacher(),
            lambda: OpenAIBackend(server.base_url, "stand-in", max_retries=0, max_in_flight=4),
        )
        rows, failed, stats = run.result()
    kept = [c for c in run.instructions() if c["kept"]]
    malformed = {c["id"]: c for c in kept if c["instruction"].startswith("reverse")}
    empty = {c["id"]: c for c in kept if c["instruction"].startswith("copy")}
    answered = {c["id"] for c in kept} - set(malformed) - set(empty)
    assert malformed and empty and answered, "the references must give all three kinds"

    by_item = {f["item_id"]: f for f in failed}
    assert len(by_item) == len(failed) == len(malformed) + len(empty)
    assert {f["stage"] for f in failed} == {"responses"}
    for item_id, c in malformed.items():
        f = by_item[item_id]
        assert f["raw"] == f"<html>upstream busy while answering {c['instruction']!r}</html>"
        assert "malformed completions response" in f["error"]
        assert (f["reference_id"], f["attempts"]) == (c["reference_id"], 1)
    for item_id, c in empty.items():
        f = by_item[item_id]
        assert (f["raw"], f["error"]) == ("  \t", "empty response")
        assert f["reference_id"] == c["reference_id"]
    assert {r["id"] for r in rows} == answered
    assert all(r["initial_response"] == "abc" for r in rows)
    assert stats["responses"] == len(answered) and stats["failed"] == len(failed)


def test_llm_teacher_malformed_answer_is_a_failure_and_the_rest_go_on(tmp_path) -> None:
    """An LLM teacher over HTTP whose server answers one reference's instruction-feedback
    request with a malformed body, and its response-feedback request with prose: two
    failure rows for that reference, each with its raw text; the other reference goes on."""
    bad_body = '{"detail": "upstream timeout"}'

    def answer(payload: dict) -> tuple[int, str]:
        prompt = payload["prompt"]
        if "List the subject areas" in prompt:
            if "reverse ab" in prompt:
                return 200, bad_body
            return 200, completion('{"subject_areas": ["copy"], "skills": []}')
        if "what makes it good" in prompt:
            if "reverse ab" in prompt:
                return 200, completion("it is good")
            feedback = {"content_quality": "a", "communication": "b", "instruction_alignment": "c"}
            return 200, completion(json.dumps(feedback))
        if "new, different instructions" in prompt:
            return 200, completion('{"instructions": ["copy xy", "copy yz"]}')
        if "Improve the response" in prompt:
            return 200, completion('{"response": "fixed"}')
        return 200, completion("q")  # the responder's one-shot prompts

    refs = references_from_rows(
        [
            {"instruction": "copy ab", "response": "ab"},
            {"instruction": "reverse ab", "response": "ba"},
        ],
        "seed",
    )
    cfg = RefedConfig(
        responder=BackendSpec(model="unused"),
        teacher="llm",
        teacher_backend=BackendSpec(model="unused"),
        samples_per_feature=2,
        max_attempts=2,
    )
    with CompletionsServer(answer) as server:
        teacher = LLMTeacher(OpenAIBackend(server.base_url, "teacher", max_retries=0))
        run = RefedRun(
            refs, cfg, tmp_path, teacher, lambda: OpenAIBackend(server.base_url, "responder")
        )
        rows, failed, stats = run.result()
        asked = [p for p in server.prompts() if "List the subject areas" in p]
    assert {r["instruction"] for r in rows} == {"copy xy", "copy yz"}
    assert all(r["response"] == "fixed" for r in rows)
    by_stage = {f["stage"]: f for f in failed}
    assert sorted(by_stage) == ["instruction_feedback", "response_feedback"]
    inst, resp = by_stage["instruction_feedback"], by_stage["response_feedback"]
    assert inst["raw"] == bad_body and inst["error"].startswith("MalformedResponse: ")
    assert resp["raw"] == "it is good" and "no JSON object" in resp["error"]
    assert inst["attempts"] == resp["attempts"] == 2
    assert {inst["reference_id"], resp["reference_id"]} == {refs[1].id}
    assert stats["references_with_feedback"] == 1
    # asked again on the second attempt, like an unparsable answer
    assert sum("reverse ab" in p for p in asked) >= 2


def test_chat_format_seeds_become_references_and_odd_conversations_are_refused():
    rows = [
        {
            "instruction": [
                {"role": "system", "content": "Answer briefly."},
                {"role": "user", "content": "Name a fruit."},
            ],
            "response": [{"role": "assistant", "content": "An apple."}],
        },
        {"instruction": "Name a colour.", "response": "Blue."},
    ]
    refs = references_from_rows(rows, "seeds")
    assert [(r.instruction, r.response) for r in refs] == [
        ("Answer briefly.\n\nName a fruit.", "An apple."),
        ("Name a colour.", "Blue."),
    ]
    two_turns = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    with pytest.raises(SeedDataError, match=r"row 0: 'instruction': chat messages with roles"):
        references_from_rows([{"instruction": two_turns, "response": "x"}], "seeds")
    with pytest.raises(SeedDataError, match=r"row 0: 'response': message 0 has role 'bot'"):
        references_from_rows(
            [{"instruction": "q", "response": [{"role": "bot", "content": "x"}]}], "seeds"
        )


def test_llm_teacher_over_chat_sends_each_answers_json_schema(tmp_path) -> None:
    """prompt_format chat sends REFED's prompts as user messages to /chat/completions;
    with structured output each request carries its answer's JSON schema, and the answers
    are validated by the same pydantic schemas."""
    from tests.helpers.completions_server import chat_completion

    def answer(payload: dict) -> tuple[int, str]:
        if "messages" not in payload:
            return 200, completion("q")  # the responder, raw
        prompt = payload["messages"][0]["content"]
        if "List the subject areas" in prompt:
            return 200, chat_completion('{"subject_areas": ["copy"], "skills": []}')
        if "what makes it good" in prompt:
            fb = {"content_quality": "a", "communication": "b", "instruction_alignment": "c"}
            return 200, chat_completion(json.dumps(fb))
        if "new, different instructions" in prompt:
            return 200, chat_completion('{"instructions": ["copy xy"]}')
        return 200, chat_completion('{"response": "fixed"}')

    refs = references_from_rows([{"instruction": "copy ab", "response": "ab"}], "seed")
    with pytest.raises(ValueError, match="teacher_structured_output: needs teacher 'llm'"):
        WorldRefedConfig(responder=BackendSpec(model="unused"), teacher_structured_output=True)
    with CompletionsServer(answer) as server:
        spec = BackendSpec(
            kind="openai", base_url=server.base_url, model="teacher", prompt_format="chat"
        )
        cfg = RefedConfig(
            responder=BackendSpec(model="unused"),
            teacher="llm",
            teacher_backend=spec,
            teacher_structured_output=True,
            samples_per_feature=1,
            max_attempts=1,
        )
        run = RefedRun(
            refs,
            cfg,
            tmp_path,
            make_teacher(cfg),
            lambda: OpenAIBackend(server.base_url, "responder"),
        )
        rows, failed, _ = run.result()
        chat_calls = [(path, p) for path, p in server.calls if "messages" in p]
    assert not failed and [r["response"] for r in rows] == ["fixed"]
    assert chat_calls and all(path.endswith("/chat/completions") for path, _ in chat_calls)
    schemas = {p["response_format"]["json_schema"]["schema"]["title"] for _, p in chat_calls}
    assert schemas == {
        "InstructionFeedback",
        "ResponseFeedback",
        "NewInstructions",
        "RefinedResponse",
    }


def test_a_server_responder_gets_more_than_a_chunk_at_once_and_the_same_rows(tmp_path) -> None:
    """Against a server, the responses stage keeps several chunks under way, so requests
    from the next chunk go out while a chunk's last ones finish; the rows are those of a
    run that works one chunk at a time."""
    server = Holding(hold=0.3)
    try:
        spec = BackendSpec(kind="openai", model="m", base_url=server.base_url, max_in_flight=8)
        assert spec.chunks_at_once(4) == 3 and BackendSpec(model="m").chunks_at_once(4) == 1
        refs = world_refs(4)

        def run(responder: BackendSpec, folder: str) -> list[dict]:
            cfg = WorldRefedConfig(responder=responder, samples_per_feature=4, chunk_size=4)
            backend = OpenAIBackend(server.base_url, "m", max_in_flight=8)
            with backend:
                rows, failed, _ = RefedRun(
                    refs, cfg, tmp_path / folder, WorldTeacher(), lambda: backend
                ).result()
            assert not failed
            return rows

        streamed = run(spec, "streamed")
        peak, server.peak = server.peak, 0
        one_at_a_time = run(BackendSpec(model="unused"), "one-at-a-time")
    finally:
        server.close()
    assert streamed == one_at_a_time and len(streamed) > 12
    assert server.peak <= 4 < peak <= 8  # a chunk's 4 requests at most, then up to 8
