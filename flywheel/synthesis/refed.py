"""REFED: reference-level feedback guided data synthesis.

After "Beyond Sample-Level Feedback: Using Reference-Level Feedback to Guide
Data Synthesis" (2025). Reading top to bottom:

1. feedback: for each reference sample, a teacher gives instruction feedback
   (subject areas, skills) and response feedback (content quality,
   communication, instruction alignment), ONCE per reference;
2. instructions: for each (reference, feature) the teacher writes
   `samples_per_feature` new instructions sharing that feature, and a ROUGE-L
   filter drops near-duplicates;
3. responses: a responder model answers each new instruction with its
   reference as a one-shot example;
4. refine: the teacher rewrites each answer following the reference's
   response feedback; an optional judge drops low-scoring samples.

Every stage is checkpointed chunk by chunk (`flywheel.store.Checkpoint`), so a
killed run resumes where it stopped; against a server, several chunks are under way
at once (`BackendSpec.chunks_at_once`), so it is never left waiting on a chunk's end.
Teacher answers are validated against pydantic schemas; an answer that does not
validate is asked again, and after `max_attempts` it is kept as a failure with its raw
text. A malformed model answer (`MalformedResponse`) or an empty response fails its own
item, kept with its raw text; a server that went away fails the chunk, which is asked
again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from flywheel.llm import Backend, BackendSpec
from flywheel.llm.base import BackendError, MalformedResponse, call_each
from flywheel.llm.chat import NotAText, as_messages, is_messages
from flywheel.llm.openai_backend import OpenAIBackend
from flywheel.store import Checkpoint
from flywheel.synthesis.rouge import diverse_subset

log = logging.getLogger(__name__)


# --- what the teacher must answer (the JSON an LLM teacher is asked for) ---


class InstructionFeedback(BaseModel):
    subject_areas: list[str] = Field(min_length=1)
    skills: list[str] = Field(default_factory=list)

    @field_validator("subject_areas", "skills")
    @classmethod
    def _clean(cls, values: list[str]) -> list[str]:
        return [v.strip() for v in values if v.strip()]


class ResponseFeedback(BaseModel):
    content_quality: str = Field(min_length=1)
    communication: str = Field(min_length=1)
    instruction_alignment: str = Field(min_length=1)


class NewInstructions(BaseModel):
    instructions: list[str] = Field(min_length=1)

    @field_validator("instructions")
    @classmethod
    def _non_empty(cls, values: list[str]) -> list[str]:
        values = [v.strip() for v in values if v.strip()]
        if not values:
            raise ValueError("all instructions are empty")
        return values


class RefinedResponse(BaseModel):
    response: str = Field(min_length=1)


class JudgeScore(BaseModel):
    score: float = Field(ge=0, le=10)


class Teacher(Protocol):
    """Each call takes a batch and returns, per item, a dict or raw text for the schema,
    or the BackendError of that item's own request (a malformed answer)."""

    name: str

    def instruction_feedback(self, references: Sequence[dict], attempt: int = 0) -> list: ...
    def response_feedback(self, references: Sequence[dict], attempt: int = 0) -> list: ...
    def new_instructions(
        self, requests: Sequence[tuple[dict, str]], n: int, attempt: int = 0
    ) -> list: ...
    def refine(self, requests: Sequence[tuple[dict, dict, str, str]], attempt: int = 0) -> list: ...
    def judge(self, requests: Sequence[tuple[str, str]], attempt: int = 0) -> list: ...


# --- inputs and parameters ---


class Reference(BaseModel):
    id: str
    instruction: str
    response: str


class SeedDataError(ValueError):
    """A seed dataset that cannot be used; the message names the column and the fix."""


def references_from_rows(rows: Sequence[dict], source: str) -> list[Reference]:
    """Validate seed rows (columns instruction, response; optional id) into references."""
    if not rows:
        raise SeedDataError(f"{source}: the seed dataset has no rows; add reference samples")
    columns = set(rows[0])
    for column in ("instruction", "response"):
        if column not in columns:
            raise SeedDataError(
                f"{source}: column {column!r} is missing (columns present: {sorted(columns)}); "
                f"the seed dataset needs text columns 'instruction' and 'response'"
            )
    problems: list[str] = []
    rows = [dict(row) for row in rows]
    for i, row in enumerate(rows):
        for column in ("instruction", "response"):
            value = row[column]
            if is_messages(value):
                try:
                    value = row[column] = _seed_text(value, column, f"row {i}: {column!r}")
                except NotAText as err:
                    problems.append(str(err))
                    continue
            if not isinstance(value, str):
                problems.append(f"row {i}: {column!r} must be text, got {type(value).__name__}")
            elif not value.strip():
                problems.append(f"row {i}: {column!r} is empty")
    if problems:
        raise SeedDataError(
            f"{source}: {len(problems)} bad value(s), e.g. "
            + "; ".join(problems[:3])
            + ". Fix or drop those rows: each reference needs a non-empty instruction and response."
        )
    refs = []
    for row in rows:
        given = row.get("id")
        ref_id = str(given) if given is not None else _digest(row["instruction"], row["response"])
        refs.append(Reference(id=ref_id, instruction=row["instruction"], response=row["response"]))
    repeated = [i for i, n in Counter(r.id for r in refs).items() if n > 1]
    if repeated:
        raise SeedDataError(
            f"{source}: {len(repeated)} reference id(s) occur more than once, e.g. "
            f"{repeated[0]!r} (rows without an 'id' get one from their text, so identical rows "
            "repeat it); drop the duplicate rows or give each row a unique 'id'"
        )
    return refs


def _seed_text(value: object, column: str, where: str) -> str:
    """A chat-format seed value as REFED's text: an instruction is one user turn (after an
    optional system turn, kept as its first paragraph), a response one assistant turn.
    Longer conversations are refused, not cut to a turn."""
    messages = as_messages(value, where=where)
    roles = [m["role"] for m in messages]
    expected = (["user"], ["system", "user"]) if column == "instruction" else (["assistant"],)
    if roles not in expected:
        shapes = " or ".join("[" + ", ".join(e) + "]" for e in expected)
        raise NotAText(
            f"{where}: chat messages with roles {roles}; a seed {column} is {shapes} "
            "(split longer conversations into one row per turn)"
        )
    return "\n\n".join(m["content"] for m in messages)


# A plain-text one-shot prompt; a domain with its own format (the flows' world) sets its own.
RESPONSE_TEMPLATE = (
    "Instruction: {example_instruction}\nResponse: {example_response}\n\n"
    "Instruction: {instruction}\nResponse:"
)


class RefedConfig(BaseModel):
    """REFED's knobs. The responder is required; the teacher is an LLM over
    `teacher_backend` unless the caller names and passes a programmatic one."""

    samples_per_feature: int = Field(8, ge=1, le=200)
    max_features_per_reference: int = Field(3, ge=1)
    teacher: str = Field(
        "llm",
        min_length=1,
        description="'llm': LLMTeacher over teacher_backend; another name: a programmatic "
        "teacher that the caller builds and passes to RefedRun",
    )
    teacher_backend: BackendSpec | None = None
    responder: BackendSpec
    response_template: str = Field(
        RESPONSE_TEMPLATE,
        description="the responder's one-shot prompt; "
        "fields: {example_instruction}, {example_response}, {instruction}",
    )
    response_stop: list[str] | None = Field(
        ["\nInstruction:"], description="stop strings for responses"
    )
    max_new_tokens: int = Field(256, ge=1, description="tokens per responder answer")
    teacher_max_new_tokens: int = Field(
        512, ge=1, description="tokens per answer of an LLM teacher (feedback, instructions)"
    )
    teacher_structured_output: bool = Field(
        False,
        description="send each answer's JSON schema to an HTTP teacher (vLLM's structured "
        "output), so it can only answer in shape; answers are validated the same either way",
    )
    diversity_threshold: float | None = Field(
        0.7, ge=0, le=1, description="ROUGE-L above which a new instruction is dropped; null: off"
    )
    judge_filter: bool = False
    judge_min_score: float = Field(7.0, ge=0, le=10)
    max_attempts: int = Field(3, ge=1, le=10)
    chunk_size: int = Field(256, ge=1)
    seed: int = 0

    @field_validator("response_template")
    @classmethod
    def _template_fields(cls, template: str) -> str:
        try:
            template.format(example_instruction="", example_response="", instruction="")
        except (KeyError, IndexError, ValueError) as err:
            raise ValueError(
                f"response_template may only use {{example_instruction}}, "
                f"{{example_response}} and {{instruction}}: {err!r}"
            ) from err
        if "{instruction}" not in template:
            raise ValueError("response_template must contain {instruction}")
        return template

    @model_validator(mode="after")
    def _llm_teacher_needs_backend(self) -> RefedConfig:
        if self.teacher == "llm" and self.teacher_backend is None:
            raise ValueError("teacher_backend is required when teacher='llm'")
        teacher = self.teacher_backend
        if self.teacher_structured_output and (teacher is None or teacher.kind == "transformers"):
            raise ValueError(
                "teacher_structured_output: needs teacher 'llm' with an HTTP teacher_backend "
                "(kind 'openai' or 'vllm') whose server supports JSON-schema output, as vLLM does"
            )
        if (
            teacher is not None
            and teacher.kind == self.responder.kind == "vllm"
            and teacher.server == self.responder.server
        ):
            raise ValueError(
                f"teacher_backend.server and responder.server both name {teacher.server!r}: "
                "two managed servers started from one entry would take the same port; give "
                "the second its own entry, or reach the running one with kind 'openai'"
            )
        return self


# --- validated teacher calls ---


def _digest(*parts: object) -> str:
    return hashlib.sha1("\x1f".join(map(str, parts)).encode()).hexdigest()[:16]


def parse_payload(payload: Any, schema: type[BaseModel]) -> BaseModel:
    """A teacher payload (dict, or text holding a JSON object) validated against schema."""
    if isinstance(payload, str):
        start, end = payload.find("{"), payload.rfind("}")
        if start < 0 or end < start:
            raise ValueError("no JSON object in the answer")
        payload = json.loads(payload[start : end + 1])
    return schema.model_validate(payload)


def ask_validated(
    call: Callable[[list[Any], int], list[Any]],
    items: Sequence[Any],
    schema: type[BaseModel],
    max_attempts: int,
) -> tuple[list[BaseModel | dict], int]:
    """Ask the teacher, re-asking only the items whose answer did not validate.

    Returns (per item: the validated model, or a failure dict with the raw
    text and error), and the number of requests made (retries included).
    Answers that do not validate, and malformed answers the teacher returns in
    place of an item's text, become failures; backend errors raised propagate.
    """
    results: list[BaseModel | dict | None] = [None] * len(items)
    pending = list(range(len(items)))
    requests = 0
    for attempt in range(max_attempts):
        if not pending:
            break
        requests += len(pending)
        # a BackendError (server gone, after the backend's own retries) propagates: the
        # chunk is not checkpointed, so a retry of the task or a re-run asks again
        answers = call([items[i] for i in pending], attempt)
        still = []
        for i, answer in zip(pending, answers, strict=True):
            if isinstance(answer, BackendError):
                results[i] = {"raw": answer.raw, "error": f"{type(answer).__name__}: {answer}"}
                still.append(i)
                continue
            try:
                results[i] = parse_payload(answer, schema)
            except (ValueError, ValidationError) as err:
                raw = answer if isinstance(answer, str) else json.dumps(answer)
                results[i] = {"raw": raw, "error": f"{schema.__name__}: {err}".strip()[:2000]}
                still.append(i)
        pending = still
    for i in pending:
        results[i]["attempts"] = max_attempts  # type: ignore[index]
    return results, requests  # type: ignore[return-value]


# --- the run ---


class RefedRun:
    """One REFED synthesis over a fixed set of references, checkpointed in `workdir`."""

    def __init__(
        self,
        references: Sequence[Reference],
        config: RefedConfig,
        workdir: str | Path,
        teacher: Teacher,
        responder: Callable[[], Backend],
        family_of: Callable[[str], str | None] | None = None,
    ) -> None:
        """`family_of` names the kind of task a new instruction is, for the samples'
        `family` column (None: the column stays empty)."""
        if not references:
            raise SeedDataError("no references: REFED needs at least one reference sample")
        self.references = list(references)
        self.config = config
        self.ckpt = Checkpoint(workdir)
        self.teacher = teacher
        self.make_responder = responder
        self.family_of = family_of
        self._by_id = {r.id: r for r in self.references}

    def close(self) -> None:
        """Release the teacher's backend, if it holds one."""
        close = getattr(self.teacher, "close", None)
        if close is not None:
            close()

    def __enter__(self) -> RefedRun:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def _teacher_at_once(self) -> int:
        """Chunks asked of the teacher at once: several for an LLM teacher over HTTP."""
        backend = self.config.teacher_backend
        if self.config.teacher != "llm" or backend is None:
            return 1
        return backend.chunks_at_once(self.config.chunk_size)

    def _failure(self, stage: str, item_id: str, reference_id: str, fail: dict) -> dict:
        return {
            "stage": stage,
            "item_id": item_id,
            "reference_id": reference_id,
            "raw": fail.get("raw", ""),
            "error": fail.get("error", ""),
            "attempts": fail.get("attempts", self.config.max_attempts),
        }

    def feedback(self) -> list[dict]:
        """Stage 1: instruction and response feedback, once per reference.

        A row holds both feedbacks, or `failures`: one failure per request that failed.
        """
        cfg = self.config

        def run(refs: list[dict]) -> list[dict]:
            inst, n_inst = ask_validated(
                self.teacher.instruction_feedback, refs, InstructionFeedback, cfg.max_attempts
            )
            resp, n_resp = ask_validated(
                self.teacher.response_feedback, refs, ResponseFeedback, cfg.max_attempts
            )
            rows = []
            for ref, i, r in zip(refs, inst, resp, strict=True):
                row = {"reference_id": ref["id"], "requests": (n_inst + n_resp) / len(refs)}
                # one failure per failed request: both are kept when both failed
                failures = [
                    self._failure(stage, ref["id"], ref["id"], answer)
                    for stage, answer in (("instruction_feedback", i), ("response_feedback", r))
                    if isinstance(answer, dict)
                ]
                if failures:
                    row["failures"] = failures
                else:
                    row.update(i.model_dump(), **r.model_dump())
                rows.append(row)
            return rows

        refs = [r.model_dump() for r in self.references]
        return self.ckpt.map_chunks("feedback", refs, run, cfg.chunk_size, self._teacher_at_once)

    def instructions(self) -> list[dict]:
        """Stage 2: new instructions per (reference, feature), then the diversity filter."""
        cfg = self.config
        requests = []
        for fb in self.feedback():
            if "failures" in fb:
                continue
            features = [f"subject:{s}" for s in fb["subject_areas"]]
            features += [f"skill:{s}" for s in fb["skills"]]
            ref = self._by_id[fb["reference_id"]].model_dump()
            requests += [(ref, f) for f in features[: cfg.max_features_per_reference]]

        def run(chunk: list[tuple[dict, str]]) -> list[dict]:
            answers, n = ask_validated(
                lambda reqs, attempt: self.teacher.new_instructions(
                    reqs, cfg.samples_per_feature, attempt
                ),
                chunk,
                NewInstructions,
                cfg.max_attempts,
            )
            rows = []
            for (ref, feature), answer in zip(chunk, answers, strict=True):
                row = {"reference_id": ref["id"], "feature": feature, "requests": n / len(chunk)}
                if isinstance(answer, dict):
                    key = _digest(ref["id"], feature)
                    row["failure"] = self._failure("new_instructions", key, ref["id"], answer)
                else:
                    row["instructions"] = answer.instructions[: cfg.samples_per_feature]
                rows.append(row)
            return rows

        proposed = self.ckpt.map_chunks(
            "instructions", requests, run, cfg.chunk_size, self._teacher_at_once
        )
        cached = self.ckpt.get("candidates")
        if cached is not None:
            return cached
        candidates = [
            {
                "id": _digest(p["reference_id"], p["feature"], k, text),
                "reference_id": p["reference_id"],
                "feature": p["feature"],
                "instruction": text,
            }
            for p in proposed
            if "instructions" in p
            for k, text in enumerate(p["instructions"])
        ]
        if cfg.diversity_threshold is not None:
            seen = [r.instruction for r in self.references]
            keep = diverse_subset(
                [c["instruction"] for c in candidates], cfg.diversity_threshold, seen
            )
        else:
            keep = [True] * len(candidates)
        for c, k in zip(candidates, keep, strict=True):
            c["kept"] = k
        self.ckpt.put("candidates", candidates)
        return candidates

    def responses(self) -> list[dict]:
        """Stage 3: the responder answers each kept instruction, its reference as one-shot."""
        cfg = self.config
        # similar lengths in a chunk: the backend pads each batch to its longest prompt
        items = sorted(
            (c for c in self.instructions() if c["kept"]),
            key=lambda c: len(c["instruction"]) + len(self._by_id[c["reference_id"]].instruction),
        )
        responder: Backend | None = None
        making = threading.Lock()  # chunks run on several threads against a server

        def run(chunk: list[dict]) -> list[dict]:
            nonlocal responder
            with making:
                responder = responder or self.make_responder()
            prompts = []
            for c in chunk:
                ref = self._by_id[c["reference_id"]]
                prompts.append(
                    cfg.response_template.format(
                        example_instruction=ref.instruction,
                        example_response=ref.response,
                        instruction=c["instruction"],
                    )
                )
            # a malformed answer fails its own item; any other BackendError (a server gone)
            # propagates: this chunk is not checkpointed and is asked again by the task's
            # retry or the next run; earlier chunks are kept
            texts = call_each(
                lambda batch: responder.generate(
                    batch, max_new_tokens=cfg.max_new_tokens, stop=cfg.response_stop, seed=cfg.seed
                ),
                prompts,
            )
            return [self._response_row(c, t) for c, t in zip(chunk, texts, strict=True)]

        try:
            at_once = cfg.responder.chunks_at_once(cfg.chunk_size)
            return self.ckpt.map_chunks("responses", items, run, cfg.chunk_size, at_once)
        finally:
            if responder is not None:
                responder.close()

    def _response_row(self, candidate: dict, answer: str | MalformedResponse) -> dict:
        """The responder's answer, or a failure with its raw text: malformed or empty."""
        if isinstance(answer, MalformedResponse):
            fail = {"raw": answer.raw, "error": str(answer), "attempts": 1}
        elif not answer.strip():
            fail = {"raw": answer, "error": "empty response", "attempts": 1}
        else:
            return {"id": candidate["id"], "response": answer.strip()}
        item_id, reference_id = candidate["id"], candidate["reference_id"]
        return {"id": item_id, "failure": self._failure("responses", item_id, reference_id, fail)}

    def refine(self) -> list[dict]:
        """Stage 4: refine each answer with its reference's response feedback; optional judge."""
        cfg = self.config
        feedback = {fb["reference_id"]: fb for fb in self.feedback() if "failures" not in fb}
        candidates = {c["id"]: c for c in self.instructions()}
        items = [r for r in self.responses() if "failure" not in r]

        def run(chunk: list[dict]) -> list[dict]:
            requests = []
            for r in chunk:
                c = candidates[r["id"]]
                fb = feedback[c["reference_id"]]
                resp_fb = ResponseFeedback.model_validate(fb).model_dump()
                ref = self._by_id[c["reference_id"]].model_dump()
                requests.append((ref, resp_fb, c["instruction"], r["response"]))
            refined, _ = ask_validated(
                self.teacher.refine, requests, RefinedResponse, cfg.max_attempts
            )
            scores: list[Any] = [None] * len(chunk)
            if cfg.judge_filter:
                judged = [
                    (req[2], ans.response)
                    for req, ans in zip(requests, refined, strict=True)
                    if not isinstance(ans, dict)
                ]
                judge_out, _ = ask_validated(
                    self.teacher.judge, judged, JudgeScore, cfg.max_attempts
                )
                it = iter(judge_out)
                scores = [None if isinstance(a, dict) else next(it) for a in refined]
            rows = []
            for r, ans, score in zip(chunk, refined, scores, strict=True):
                c = candidates[r["id"]]
                if isinstance(ans, dict):
                    fail = self._failure("refine", r["id"], c["reference_id"], ans)
                    rows.append({"id": r["id"], "failure": fail})
                elif isinstance(score, dict):
                    fail = self._failure("judge", r["id"], c["reference_id"], score)
                    rows.append({"id": r["id"], "failure": fail})
                else:
                    rows.append(
                        {
                            "id": r["id"],
                            "response": ans.response,
                            "judge_score": None if score is None else score.score,
                        }
                    )
            return rows

        return self.ckpt.map_chunks("refined", items, run, cfg.chunk_size, self._teacher_at_once)

    def result(self) -> tuple[list[dict], list[dict], dict]:
        """(synthesized rows, failed rows, stats) from the finished stages."""
        started = time.monotonic()
        cfg = self.config
        feedback = self.feedback()
        candidates = {c["id"]: c for c in self.instructions()}
        proposed = self.ckpt.load("instructions")
        responses = {r["id"]: r for r in self.responses()}
        refined = self.refine()

        failed = [f for fb in feedback for f in fb.get("failures", [])]
        failed += [p["failure"] for p in proposed if "failure" in p]
        failed += [r["failure"] for r in responses.values() if "failure" in r]
        failed += [r["failure"] for r in refined if "failure" in r]

        rows, dropped_by_judge, changed = [], 0, 0
        for r in refined:
            if "failure" in r:
                continue
            if cfg.judge_filter and r["judge_score"] < cfg.judge_min_score:
                dropped_by_judge += 1
                continue
            c = candidates[r["id"]]
            ref = self._by_id[c["reference_id"]]
            initial = responses[r["id"]]["response"]
            changed += initial != r["response"]
            rows.append(
                {
                    "id": r["id"],
                    "reference_id": ref.id,
                    "reference_instruction": ref.instruction,
                    "feature": c["feature"],
                    "family": self.family_of(c["instruction"]) if self.family_of else None,
                    "instruction": c["instruction"],
                    "response": r["response"],
                    "initial_response": initial,
                    "refined": initial != r["response"],
                    "judge_score": r["judge_score"],
                }
            )
        feedback_requests = sum(fb["requests"] for fb in feedback)
        stats = {
            "references": len(self.references),
            "references_with_feedback": sum("failures" not in fb for fb in feedback),
            "feedback_requests": feedback_requests,
            "instructions_proposed": len(candidates),
            "dropped_by_diversity": sum(not c["kept"] for c in candidates.values()),
            "responses": sum("failure" not in r for r in responses.values()),
            "refined_changed": changed,
            "dropped_by_judge": dropped_by_judge,
            "rows": len(rows),
            "failed": len(failed),
            "feedback_requests_per_sample": feedback_requests / len(rows) if rows else None,
            "samples_per_reference": len(rows) / len(self.references),
            "assemble_seconds": time.monotonic() - started,
        }
        return rows, failed, stats


# --- an LLM teacher over any backend ---

JSON_RULE = "Answer with one JSON object and nothing else."

PROMPTS = {
    "instruction_feedback": (
        "You review a reference example of an instruction and its response.\n"
        "Instruction: {instruction}\nResponse: {response}\n"
        'List the subject areas it covers and the skills it needs, as {{"subject_areas": '
        '["..."], "skills": ["..."]}}. ' + JSON_RULE + "\n"
    ),
    "response_feedback": (
        "You review the response of a reference example and say what makes it good.\n"
        "Instruction: {instruction}\nResponse: {response}\n"
        'Give {{"content_quality": "...", "communication": "...", "instruction_alignment": '
        '"..."}}. ' + JSON_RULE + "\n"
    ),
    "new_instructions": (
        "Reference instruction: {instruction}\nWrite {n} new, different instructions that "
        'share this feature: {feature}. Give {{"instructions": ["...", ...]}}. ' + JSON_RULE + "\n"
    ),
    "refine": (
        "Improve the response so that it has these qualities.\n"
        "Content quality: {content_quality}\nCommunication: {communication}\n"
        "Instruction alignment: {instruction_alignment}\n"
        "Instruction: {new_instruction}\nResponse: {new_response}\n"
        'Give {{"response": "..."}}. ' + JSON_RULE + "\n"
    ),
    "judge": (
        "Rate the response to the instruction from 0 (useless) to 10 (perfect).\n"
        "Instruction: {instruction}\nResponse: {response}\n"
        'Give {{"score": <number>}}. ' + JSON_RULE + "\n"
    ),
}


class LLMTeacher:
    """REFED's teacher over any backend: prompts ask for JSON, REFED validates it.

    Takes a backend, or a function that makes one: then the backend (a model to
    load, a server to start) is made on the first question only, so stages that
    are already checkpointed cost nothing, and `close()` releases it.
    """

    name = "llm"

    def __init__(
        self,
        backend: Backend | Callable[[], Backend],
        max_new_tokens: int = 512,
        structured_output: bool = False,
    ) -> None:
        self._backend = backend if isinstance(backend, Backend) else None
        self._make_backend = None if isinstance(backend, Backend) else backend
        self._making = threading.Lock()  # chunks may ask from several threads at once
        self.max_new_tokens = max_new_tokens
        self.structured_output = structured_output

    @property
    def backend(self) -> Backend:
        with self._making:
            if self._backend is None:
                self._backend = self._make_backend()  # type: ignore[misc]
            return self._backend

    def close(self) -> None:
        if self._backend is not None and self._make_backend is not None:
            self._backend.close()
            self._backend = None

    def _ask(
        self, prompts: list[str], attempt: int, schema: type[BaseModel]
    ) -> list[str | MalformedResponse]:
        # a malformed answer stays with its prompt (ask_validated records it and asks
        # again); a retry samples instead of repeating the same greedy answer
        options: dict[str, Any] = dict(
            max_new_tokens=self.max_new_tokens,
            temperature=0.0 if attempt == 0 else 0.7,
            seed=attempt,
        )
        if self.structured_output:
            if not isinstance(self.backend, OpenAIBackend):
                raise ValueError(
                    "teacher_structured_output needs an HTTP teacher (kind 'openai' or "
                    "'vllm') whose server supports JSON-schema output"
                )
            options["json_schema"] = schema.model_json_schema()
        return call_each(lambda batch: self.backend.generate(batch, **options), prompts)

    def instruction_feedback(
        self, references: Sequence[dict], attempt: int = 0
    ) -> list[str | MalformedResponse]:
        template = PROMPTS["instruction_feedback"]
        return self._ask([template.format(**r) for r in references], attempt, InstructionFeedback)

    def response_feedback(
        self, references: Sequence[dict], attempt: int = 0
    ) -> list[str | MalformedResponse]:
        template = PROMPTS["response_feedback"]
        return self._ask([template.format(**r) for r in references], attempt, ResponseFeedback)

    def new_instructions(
        self, requests: Sequence[tuple[dict, str]], n: int, attempt: int = 0
    ) -> list[str | MalformedResponse]:
        template = PROMPTS["new_instructions"]
        prompts = [template.format(n=n, feature=f, **ref) for ref, f in requests]
        return self._ask(prompts, attempt, NewInstructions)

    def refine(
        self, requests: Sequence[tuple[dict, dict, str, str]], attempt: int = 0
    ) -> list[str | MalformedResponse]:
        template = PROMPTS["refine"]
        prompts = [
            template.format(new_instruction=instr, new_response=resp, **fb)
            for _ref, fb, instr, resp in requests
        ]
        return self._ask(prompts, attempt, RefinedResponse)

    def judge(
        self, requests: Sequence[tuple[str, str]], attempt: int = 0
    ) -> list[str | MalformedResponse]:
        template = PROMPTS["judge"]
        prompts = [template.format(instruction=i, response=r) for i, r in requests]
        return self._ask(prompts, attempt, JudgeScore)


def make_teacher(config: RefedConfig) -> Teacher:
    """The LLM teacher of `config`; a programmatic teacher is built by its caller."""
    if config.teacher != "llm":
        raise ValueError(
            f"teacher: {config.teacher!r} is not built here; build that teacher and pass it "
            "to RefedRun, or use teacher 'llm' with a teacher_backend"
        )
    from flywheel.llm import make_backend

    return LLMTeacher(
        lambda: make_backend(config.teacher_backend),  # type: ignore[arg-type]
        max_new_tokens=config.teacher_max_new_tokens,
        structured_output=config.teacher_structured_output,
    )
