"""OpenAIBackend: a real `transformers serve`, stand-in HTTP servers, canned vLLM payloads."""

import json
import socket
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from flywheel.llm import BackendError, ManagedServer, OpenAIBackend, TokenLogprob
from flywheel.llm import openai_backend as ob
from flywheel.llm.base import MalformedResponse, call_each
from flywheel.llm.openai_backend import parse_span_logprobs, parse_text, parse_top_logprobs
from flywheel.world.models import new_tiny_model, save_tiny
from tests.helpers.completions_server import CompletionsServer, completion


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny(new_tiny_model("small"), tmp_path_factory.mktemp("llm") / "tiny")


# --- against a real server ------------------------------------------------


@pytest.fixture(scope="module")
def served(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`transformers serve` on the tiny model; yields its base_url."""
    port = free_port()
    exe = Path(sys.executable).parent / "transformers"
    command = [exe, "serve", tiny_model_dir, "--host", "127.0.0.1", "--port", port]
    base_url = f"http://127.0.0.1:{port}/v1"
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    with ManagedServer(
        command, base_url, startup_timeout=120, env={"HF_HUB_OFFLINE": "1"}, log_path=log
    ):
        yield base_url


@pytest.mark.slow
def test_generate_against_transformers_serve(served: str, tiny_model_dir: Path) -> None:
    prompts = ["hello", "ab c", "x", "what is 2?"]
    with OpenAIBackend(served, str(tiny_model_dir), batch_size=4) as backend:
        texts = backend.generate(prompts, max_new_tokens=6)
        assert len(texts) == len(prompts)
        assert all(isinstance(t, str) and 0 < len(t) <= 6 for t in texts)
        # Greedy is deterministic and does not depend on the other requests.
        assert backend.generate(prompts[:1], max_new_tokens=6) == texts[:1]
        # This random model repeats the prompt's last character: "x" -> "xxxxxx".
        (cut,) = backend.generate(["x"], max_new_tokens=6, stop=["xxx"])
        assert "xxx" not in cut and len(cut) < 6
        sampled = backend.generate(prompts, max_new_tokens=4, temperature=1.0, seed=3)
        assert all(isinstance(t, str) for t in sampled)


@pytest.mark.slow
def test_score_reports_missing_logprobs(served: str, tiny_model_dir: Path) -> None:
    # transformers serve ignores `echo`/`logprobs`: a clear error, not wrong numbers.
    with OpenAIBackend(served, str(tiny_model_dir)) as backend:
        with pytest.raises(BackendError, match="logprobs") as err:
            backend.score(["hello "], ["world"])
        assert err.value.raw and "choices" in err.value.raw


# --- retries, against stand-in servers ------------------------------------


class Scripted:
    """A local HTTP server that answers POSTs with a scripted list of (status, body)."""

    def __init__(self, replies: list[tuple[int, str]]) -> None:
        self.replies = list(replies)
        self.requests: list[dict] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                outer.requests.append(json.loads(body))
                status, text = outer.replies.pop(0) if len(outer.replies) > 1 else outer.replies[0]
                data = text.encode()
                self.send_response(status)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *a: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


OK = json.dumps({"choices": [{"index": 0, "text": " world", "finish_reason": "length"}]})


@pytest.fixture
def scripted() -> Iterator[type[Scripted]]:
    servers: list[Scripted] = []

    def make(replies: list[tuple[int, str]]) -> Scripted:
        servers.append(Scripted(replies))
        return servers[-1]

    yield make
    for s in servers:
        s.close()


@pytest.fixture
def sleeps(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """Record backoff sleeps instead of sleeping."""
    delays: list[float] = []
    monkeypatch.setattr(ob.time, "sleep", delays.append)
    return delays


def test_server_down_raises_after_retries(sleeps: list[float]) -> None:
    backend = OpenAIBackend(f"http://127.0.0.1:{free_port()}/v1", "m", max_retries=3, backoff=0.1)
    with pytest.raises(BackendError, match="after 4 attempt") as err:
        backend.generate(["hi"])
    assert err.value.raw is None
    assert len(sleeps) == 3
    assert sleeps == sorted(sleeps) and sleeps[0] >= 0.1 and sleeps[-1] >= 0.4  # exponential


def test_real_backoff_between_retries() -> None:
    backend = OpenAIBackend(f"http://127.0.0.1:{free_port()}/v1", "m", max_retries=2, backoff=0.05)
    t0 = time.monotonic()
    with pytest.raises(BackendError):
        backend.generate(["hi"])
    assert time.monotonic() - t0 >= 0.05 + 0.1


def test_500_twice_then_ok(scripted, sleeps: list[float]) -> None:
    server = scripted([(500, "oops"), (503, "busy"), (200, OK)])
    backend = OpenAIBackend(server.base_url, "m", max_retries=4, backoff=0.01)
    out = backend.generate(["hello"], max_new_tokens=3, temperature=0.5, stop=["\n"], seed=1)
    assert out == [" world"]
    assert len(server.requests) == 3 and len(sleeps) == 2
    sent = server.requests[-1]
    assert sent["model"] == "m" and sent["prompt"] == "hello"
    assert (sent["max_tokens"], sent["temperature"], sent["stop"], sent["seed"]) == (
        3,
        0.5,
        ["\n"],
        1,
    )


def test_retries_exhausted_keep_last_raw(scripted, sleeps: list[float]) -> None:
    server = scripted([(429, "slow down"), (502, "bad gateway body")])
    backend = OpenAIBackend(server.base_url, "m", max_retries=1, backoff=0.01)
    with pytest.raises(BackendError, match="HTTP 502") as err:
        backend.generate(["hello"])
    assert err.value.raw == "bad gateway body"


def test_client_error_is_not_retried(scripted, sleeps: list[float]) -> None:
    server = scripted([(400, '{"detail":"prompt must be a string."}')])
    backend = OpenAIBackend(server.base_url, "m", max_retries=3, backoff=0.01)
    with pytest.raises(BackendError, match="HTTP 400") as err:
        backend.generate(["hello"])
    assert "prompt must be a string" in err.value.raw
    assert len(server.requests) == 1 and sleeps == []


def test_invalid_json_raises_with_raw(scripted, sleeps: list[float]) -> None:
    server = scripted([(200, "<html>not json</html>")])
    backend = OpenAIBackend(server.base_url, "m", max_retries=3, backoff=0.01)
    with pytest.raises(BackendError) as err:
        backend.generate(["hello"])
    assert err.value.raw == "<html>not json</html>"


def test_many_prompts_one_request_each(scripted) -> None:
    server = scripted([(200, OK)])
    backend = OpenAIBackend(server.base_url, "m", batch_size=4)
    assert backend.generate([f"p{i}" for i in range(10)]) == [" world"] * 10
    assert sorted(r["prompt"] for r in server.requests) == sorted(f"p{i}" for i in range(10))


# --- parsing canned vLLM-format payloads ----------------------------------

# vLLM /v1/completions with echo=true, logprobs=0, max_tokens=1 on
# prompt "The cat" + completion " sat on": the prompt's first token has no
# logprob, the last token (" the") is the one generated token.
ECHO = json.dumps(
    {
        "id": "cmpl-1",
        "object": "text_completion",
        "model": "m",
        "choices": [
            {
                "index": 0,
                "text": "The cat sat on the",
                "logprobs": {
                    "tokens": ["The", " cat", " sat", " on", " the"],
                    "token_logprobs": [None, -2.5, -1.25, -0.5, -0.75],
                    "top_logprobs": [None, {" cat": -2.5}, {" sat": -1.25}, {" on": -0.5}, {}],
                    "text_offset": [0, 3, 7, 11, 14],
                },
                "finish_reason": "length",
            }
        ],
    }
)

TOPK = json.dumps(
    {
        "choices": [
            {
                "index": 0,
                "text": " sat",
                "logprobs": {
                    "tokens": [" sat"],
                    "token_logprobs": [-0.9],
                    "top_logprobs": [{" is": -1.5, " sat": -0.9, " was": -2.25, "!": -4.0}],
                    "text_offset": [7],
                },
            }
        ]
    }
)


def test_parse_span_logprobs() -> None:
    assert parse_span_logprobs(ECHO, len("The cat"), len("The cat sat on")) == [-1.25, -0.5]
    assert parse_span_logprobs(ECHO, 0 + 3, 7) == [-2.5]
    # A token straddling the boundary (" sat" starts at 7) is left out.
    assert parse_span_logprobs(ECHO, 8, 14) == [-0.5]


def test_parse_top_logprobs() -> None:
    assert parse_top_logprobs(TOPK, 2) == [TokenLogprob(" sat", -0.9), TokenLogprob(" is", -1.5)]
    assert [t.token for t in parse_top_logprobs(TOPK, 10)] == [" sat", " is", " was", "!"]


def test_parse_text() -> None:
    assert parse_text(ECHO) == "The cat sat on the"


@pytest.mark.parametrize(
    "raw",
    [
        "",
        "not json",
        "[]",
        json.dumps({"choices": []}),
        json.dumps({"choices": [{"text": 3}]}),
        json.dumps({"error": {"message": "model not loaded"}}),
    ],
)
def test_malformed_text_payloads(raw: str) -> None:
    with pytest.raises(MalformedResponse) as err:
        parse_text(raw)
    assert err.value.raw == raw


@pytest.mark.parametrize(
    "logprobs",
    [
        None,
        {},
        {"tokens": ["a"], "token_logprobs": [-1.0]},
        {"tokens": ["a"], "token_logprobs": [-1.0, -2.0], "text_offset": [0]},
        {"tokens": ["a", "b"], "token_logprobs": [None, None], "text_offset": [0, 1]},
        {"tokens": ["a", "b"], "token_logprobs": [-1.0, -2.0], "text_offset": [0, 1]},
    ],
)
def test_malformed_logprob_payloads(logprobs) -> None:
    raw = json.dumps({"choices": [{"text": "ab", "logprobs": logprobs}]})
    with pytest.raises(BackendError) as err:
        parse_span_logprobs(raw, 1, 5)  # the last case: offsets never reach the completion
        parse_span_logprobs(raw, 5, 9)
    assert err.value.raw == raw


@pytest.mark.parametrize(
    "logprobs",
    [None, {}, {"top_logprobs": []}, {"top_logprobs": [None]}, {"top_logprobs": [{"a": "x"}]}],
)
def test_malformed_top_logprobs(logprobs) -> None:
    raw = json.dumps({"choices": [{"text": "a", "logprobs": logprobs}]})
    with pytest.raises(BackendError) as err:
        parse_top_logprobs(raw, 3)
    assert err.value.raw == raw


def test_score_and_topk_over_http(scripted) -> None:
    server = scripted([(200, ECHO)])
    backend = OpenAIBackend(server.base_url, "m")
    assert backend.score(["The cat", "x"], [" sat on", ""]) == [[-1.25, -0.5], []]
    (sent,) = server.requests
    assert sent["prompt"] == "The cat sat on" and sent["echo"] is True
    assert sent["logprobs"] == 0 and sent["max_tokens"] == 1
    server.replies = [(200, TOPK)]
    assert backend.next_token_topk(["The cat"], k=2) == [
        [TokenLogprob(" sat", -0.9), TokenLogprob(" is", -1.5)]
    ]
    assert server.requests[-1]["logprobs"] == 2 and server.requests[-1]["max_tokens"] == 1


# --- malformed answers: one prompt's failure, not the batch's -------------


def test_malformed_envelope_is_a_malformed_response_and_not_retried(scripted, sleeps) -> None:
    server = scripted([(200, "<html>not json</html>")])
    backend = OpenAIBackend(server.base_url, "m", max_retries=3, backoff=0.01)
    with pytest.raises(MalformedResponse, match="malformed completions response") as err:
        backend.generate(["hello"])
    assert err.value.raw == "<html>not json</html>"
    assert len(server.requests) == 1 and sleeps == []  # the server did answer


def bad_for_some(payload: dict) -> tuple[int, str]:
    """Malformed (three ways) for prompts naming it, the prompt echoed for the others."""
    prompt = payload["prompt"]
    if "not-json" in prompt:
        return 200, f"<html>busy for {prompt}</html>"
    if "no-choices" in prompt:
        return 200, json.dumps({"error": f"no choices for {prompt}"})
    if "text-not-str" in prompt:
        return 200, json.dumps({"choices": [{"text": 7}], "for": prompt})
    return 200, completion(f"answer to {prompt}")


def test_call_each_gives_each_prompt_its_own_text_or_its_own_error() -> None:
    prompts = ["a", "x not-json", "b", "y no-choices", "z text-not-str", "c"]
    with CompletionsServer(bad_for_some) as server:
        backend = OpenAIBackend(server.base_url, "m", batch_size=3)
        with pytest.raises(MalformedResponse):  # the batch as one call fails as a whole
            backend.generate(prompts)
        out = call_each(lambda batch: backend.generate(batch, max_new_tokens=4), prompts)
    assert out[0] == "answer to a" and out[2] == "answer to b" and out[5] == "answer to c"
    for i, expected in ((1, "<html>busy"), (3, "no choices"), (4, '"text": 7')):
        assert isinstance(out[i], MalformedResponse)
        assert expected in out[i].raw and prompts[i] in out[i].raw  # its own raw reply
    assert "choices[0].text" in str(out[4])


def test_call_each_lets_a_server_that_went_away_propagate(sleeps) -> None:
    backend = OpenAIBackend(f"http://127.0.0.1:{free_port()}/v1", "m", max_retries=1)
    with pytest.raises(BackendError, match="after 2 attempt") as err:
        call_each(backend.generate, ["a", "b"])
    assert not isinstance(err.value, MalformedResponse)


def test_call_each_lets_5xx_after_retries_propagate(scripted, sleeps) -> None:
    server = scripted([(503, "busy")])
    backend = OpenAIBackend(server.base_url, "m", max_retries=1, backoff=0.01)
    with pytest.raises(BackendError, match="HTTP 503") as err:
        call_each(backend.generate, ["a", "b"])
    assert not isinstance(err.value, MalformedResponse) and err.value.raw == "busy"
