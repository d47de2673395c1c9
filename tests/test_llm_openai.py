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
from flywheel.llm.chat import NotAText
from flywheel.llm.openai_backend import (
    parse_chat_text,
    parse_chat_top_logprobs,
    parse_prompt_logprobs,
    parse_span_logprobs,
    parse_text,
    parse_top_logprobs,
)
from flywheel.llm.spec import BackendSpec, make_backend
from flywheel.world.models import new_tiny_model, save_tiny
from tests.helpers.completions_server import (
    CompletionsServer,
    chat_completion,
    chat_prompt_logprobs,
    chat_top_logprobs,
    completion,
)


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
    with OpenAIBackend(served, str(tiny_model_dir), max_in_flight=4) as backend:
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

    async def record(seconds: float) -> None:
        delays.append(seconds)

    monkeypatch.setattr(ob, "pause", record)
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
    backend = OpenAIBackend(server.base_url, "m", max_in_flight=4)
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
        backend = OpenAIBackend(server.base_url, "m", max_in_flight=3)
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


# --- chat: routing, payloads and vLLM's chat formats ----------------------

# vLLM /v1/chat/completions with logprobs=true, top_logprobs=3, max_tokens=1,
# temperature 0: OpenAI's format; vLLM lists the sampled token first.
CHAT_TOPK = json.dumps(
    {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "model": "m",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "Sure"},
                "logprobs": {
                    "content": [
                        {
                            "token": "Sure",
                            "logprob": -0.5,
                            "bytes": [83, 117, 114, 101],
                            "top_logprobs": [
                                {"token": "Sure", "logprob": -0.5, "bytes": [83, 117, 114, 101]},
                                {"token": "No", "logprob": -2.75, "bytes": [78, 111]},
                                {"token": "Yes", "logprob": -1.25, "bytes": [89, 101, 115]},
                            ],
                        }
                    ]
                },
                "finish_reason": "length",
            }
        ],
        "usage": {"prompt_tokens": 9, "completion_tokens": 1, "total_tokens": 10},
    }
)

# vLLM /v1/chat/completions with continue_final_message=true, add_generation_prompt=false,
# prompt_logprobs=0, on [user "Hi", assistant "The cat sat"] under a ChatML template: one
# entry per prompt token (the first null), each {token_id: {logprob, rank, decoded_token}}.
PROMPT_TOKENS = [
    ("<|im_start|>", None),
    ("user", -3.0),
    ("\n", -0.5),
    ("Hi", -4.0),
    ("<|im_end|>", -1.0),
    ("\n", -0.25),
    ("<|im_start|>", -0.125),
    ("assistant", -0.75),
    ("\n", -0.0625),
    ("The", -1.5),
    (" cat", -2.0),
    (" sat", -0.25),
]
CHAT_SCORE = json.dumps(
    {
        "id": "chatcmpl-2",
        "object": "chat.completion",
        "model": "m",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": " on"}}],
        "prompt_logprobs": [None]
        + [
            {str(200 + i): {"logprob": lp, "rank": 3, "decoded_token": text}}
            for i, (text, lp) in enumerate(PROMPT_TOKENS[1:])
        ],
    }
)


def test_parse_chat_text() -> None:
    assert parse_chat_text(CHAT_TOPK) == "Sure"


@pytest.mark.parametrize(
    "raw",
    [
        "",
        "not json",
        "[]",
        json.dumps({"choices": []}),
        json.dumps({"choices": [{"text": "a completions body"}]}),
        json.dumps({"choices": [{"message": "hello"}]}),
        json.dumps({"choices": [{"message": {"role": "assistant", "content": None}}]}),
        json.dumps({"choices": [{"message": {"role": "assistant", "content": ["a"]}}]}),
        json.dumps({"error": {"message": "model not loaded"}}),
    ],
)
def test_malformed_chat_text_payloads(raw: str) -> None:
    with pytest.raises(MalformedResponse) as err:
        parse_chat_text(raw)
    assert err.value.raw == raw


def test_parse_chat_top_logprobs_sorts_and_cuts() -> None:
    assert parse_chat_top_logprobs(CHAT_TOPK, 2) == [
        TokenLogprob("Sure", -0.5),
        TokenLogprob("Yes", -1.25),
    ]
    assert [t.token for t in parse_chat_top_logprobs(CHAT_TOPK, 10)] == ["Sure", "Yes", "No"]


@pytest.mark.parametrize(
    "logprobs",
    [
        None,  # what `transformers serve` answers: no logprobs at all
        {},
        {"content": None},
        {"content": []},
        {"content": [{"token": "a", "logprob": -1.0, "top_logprobs": []}]},
        {"content": [{"token": "a", "logprob": -1.0}]},
        {"content": [{"token": "a", "logprob": -1.0, "top_logprobs": [{"token": "a"}]}]},
        {
            "content": [
                {"token": "a", "logprob": -1, "top_logprobs": [{"token": "a", "logprob": "x"}]}
            ]
        },
        {"content": [{"token": "a", "logprob": -1.0, "top_logprobs": {"a": -1.0}}]},
    ],
)
def test_malformed_chat_top_logprobs(logprobs) -> None:
    raw = json.dumps({"choices": [{"message": {"content": "a"}, "logprobs": logprobs}]})
    with pytest.raises(BackendError, match="must return logprobs for chat") as err:
        parse_chat_top_logprobs(raw, 3)
    assert err.value.raw == raw


def test_parse_prompt_logprobs_finds_the_completion_at_the_end() -> None:
    assert parse_prompt_logprobs(CHAT_SCORE, "The cat sat") == [-1.5, -2.0, -0.25]
    assert parse_prompt_logprobs(CHAT_SCORE, " sat") == [-0.25]
    # A completion that starts inside a token: that token counts whole.
    assert parse_prompt_logprobs(CHAT_SCORE, "at") == [-0.25]
    assert parse_prompt_logprobs(CHAT_SCORE, "he cat sat") == [-1.5, -2.0, -0.25]


def test_parse_prompt_logprobs_takes_the_prompt_token_entry_first() -> None:
    # With prompt_logprobs k > 0 vLLM lists the prompt's own token first (its vocabulary
    # rank, here 4), then the top-k (ranks 1..k); the prompt token is the first entry.
    first = {"logprob": -3.5, "rank": 4, "decoded_token": " sat"}
    top = [
        {"logprob": -0.5, "rank": 1, "decoded_token": " is"},
        {"logprob": -1.0, "rank": 2, "decoded_token": " was"},
    ]
    positions = [None, {"7": {"logprob": -2.0, "rank": 1, "decoded_token": "cat"}}]
    positions.append({"9": first, "3": top[0], "5": top[1]})
    raw = json.dumps({"choices": [], "prompt_logprobs": positions})
    assert parse_prompt_logprobs(raw, "cat sat") == [-2.0, -3.5]


def test_chat_prompt_logprobs_helper_is_parsed_like_vllm() -> None:
    raw = chat_prompt_logprobs([("<s>", 0.0), ("Hello", -1.0), (" world", -2.0)])
    assert parse_prompt_logprobs(raw, " world") == [-2.0]
    assert parse_prompt_logprobs(raw, "Hello world") == [-1.0, -2.0]


@pytest.mark.parametrize(
    "body",
    [
        {"choices": [{"message": {"content": "!"}}]},  # a server without the extension
        {"choices": [], "prompt_logprobs": None},
        {"choices": [], "prompt_logprobs": []},
        {"choices": [], "prompt_logprobs": {"1": {}}},
    ],
)
def test_missing_prompt_logprobs_say_what_is_needed(body: dict) -> None:
    raw = json.dumps(body)
    with pytest.raises(BackendError, match="needs vLLM's prompt_logprobs") as err:
        parse_prompt_logprobs(raw, "sat")
    assert err.value.raw == raw


@pytest.mark.parametrize(
    "last",
    [
        None,
        {},
        [],
        {"9": {"logprob": -1.0, "rank": 1}},
        {"9": {"logprob": -1.0, "rank": 1, "decoded_token": None}},
        {"9": {"logprob": "x", "rank": 1, "decoded_token": " sat"}},
        {"9": {"rank": 1, "decoded_token": " sat"}},
        {"9": -1.0},
    ],
)
def test_malformed_prompt_logprob_entries(last) -> None:
    positions = [None, {"7": {"logprob": -2.0, "rank": 1, "decoded_token": "cat"}}, last]
    raw = json.dumps({"choices": [], "prompt_logprobs": positions})
    with pytest.raises(BackendError, match=r"prompt_logprobs\[2\]") as err:
        parse_prompt_logprobs(raw, "cat sat")
    assert err.value.raw == raw


@pytest.mark.parametrize(
    "completion", ["The cat sat ", "cat", "dog sat", "Hi<|im_end|>The cat sat"]
)
def test_completion_not_at_the_end_is_a_clear_error(completion: str) -> None:
    with pytest.raises(BackendError, match="is not the end of the prompt tokens") as err:
        parse_prompt_logprobs(CHAT_SCORE, completion)
    assert err.value.raw == CHAT_SCORE


def chat_or_text(payload: dict) -> tuple[int, str]:
    """Each endpoint's own body: the prompt echoed, or the last message's content."""
    if "messages" in payload:
        return 200, chat_completion("chat: " + payload["messages"][-1]["content"])
    return 200, completion("text: " + payload["prompt"])


MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Name a fruit."},
]


def test_prompts_route_by_kind_and_format() -> None:
    with CompletionsServer(chat_or_text) as server:
        auto = OpenAIBackend(server.base_url, "m")
        out = auto.generate(["plain", MESSAGES], max_new_tokens=5, stop=["\n"], seed=2)
        assert out == ["text: plain", "chat: Name a fruit."]
        paths = sorted(server.calls, key=lambda c: c[0])
        (chat_path, chat_sent), (text_path, text_sent) = paths
        assert (chat_path, text_path) == ("/v1/chat/completions", "/v1/completions")
        assert chat_sent == {
            "model": "m",
            "max_tokens": 5,
            "temperature": 0.0,
            "stop": ["\n"],
            "seed": 2,
            "messages": MESSAGES,
        }
        assert text_sent["prompt"] == "plain" and "messages" not in text_sent

        server.calls.clear()
        chat = OpenAIBackend(server.base_url, "m", prompt_format="chat")
        assert chat.generate(["plain"]) == ["chat: plain"]
        ((path, sent),) = server.calls
        assert path == "/v1/chat/completions"
        assert sent["messages"] == [{"role": "user", "content": "plain"}] and "prompt" not in sent

        server.calls.clear()
        raw = OpenAIBackend(server.base_url, "m", prompt_format="raw")
        assert raw.generate([MESSAGES]) == ["chat: Name a fruit."]  # messages always go as chat
        assert [path for path, _ in server.calls] == ["/v1/chat/completions"]


def test_json_schema_is_sent_on_both_endpoints() -> None:
    schema = {"type": "object", "properties": {"x": {"type": "integer"}}, "required": ["x"]}
    with CompletionsServer(chat_or_text) as server:
        backend = OpenAIBackend(server.base_url, "m")
        backend.generate(["plain", MESSAGES], json_schema=schema)
        sent = {path: payload for path, payload in server.calls}
        assert sent["/v1/chat/completions"]["response_format"] == {
            "type": "json_schema",
            "json_schema": {"name": "answer", "schema": schema},
        }
        assert "structured_outputs" not in sent["/v1/chat/completions"]
        assert sent["/v1/completions"]["structured_outputs"] == {"json": schema}
        assert "response_format" not in sent["/v1/completions"]

        server.calls.clear()
        backend.generate(["plain", MESSAGES])
        for _, payload in server.calls:
            assert "response_format" not in payload and "structured_outputs" not in payload


def bad_chat_for_some(payload: dict) -> tuple[int, str]:
    content = payload["messages"][-1]["content"]
    if "null" in content:
        return 200, chat_completion(None)
    if "not-json" in content:
        return 200, f"<html>busy for {content}</html>"
    return 200, chat_completion(f"answer to {content}")


def test_call_each_over_chat_keeps_each_prompts_own_error() -> None:
    prompts = ["a", "x null", "b", "y not-json"]
    with CompletionsServer(bad_chat_for_some) as server:
        backend = OpenAIBackend(server.base_url, "m", prompt_format="chat", max_in_flight=2)
        out = call_each(backend.generate, prompts)
    assert out[0] == "answer to a" and out[2] == "answer to b"
    assert isinstance(out[1], MalformedResponse) and '"content": null' in out[1].raw
    assert "message.content" in str(out[1])
    assert isinstance(out[3], MalformedResponse) and "busy for y not-json" in out[3].raw


def test_bad_prompts_fail_up_front_naming_the_prompt() -> None:
    with CompletionsServer(chat_or_text) as server:
        backend = OpenAIBackend(server.base_url, "m")
        with pytest.raises(NotAText, match="prompt 1: message 0 has role 'bot'"):
            backend.generate(["fine", [{"role": "bot", "content": "hi"}]])
        with pytest.raises(NotAText, match="prompt 0"):
            backend.score([3], ["x"])  # type: ignore[list-item]
        assert server.calls == []
    with pytest.raises(ValueError, match="prompt_format"):
        OpenAIBackend("http://127.0.0.1:1/v1", "m", prompt_format="template")  # type: ignore[arg-type]


def test_make_backend_passes_prompt_format() -> None:
    spec = BackendSpec(
        kind="openai", model="m", base_url="http://127.0.0.1:1/v1", prompt_format="chat"
    )
    with make_backend(spec) as backend:
        assert isinstance(backend, OpenAIBackend) and backend.prompt_format == "chat"


def test_score_over_chat_sends_the_answer_as_an_open_assistant_turn() -> None:
    with CompletionsServer(lambda payload: (200, CHAT_SCORE)) as server:
        backend = OpenAIBackend(server.base_url, "m")
        prompt = [{"role": "user", "content": "Hi"}]
        assert backend.score([prompt, prompt], ["The cat sat", ""]) == [[-1.5, -2.0, -0.25], []]
        ((path, sent),) = server.calls  # an empty completion asks nothing
        assert path == "/v1/chat/completions"
        assert sent["messages"] == [*prompt, {"role": "assistant", "content": "The cat sat"}]
        assert sent["continue_final_message"] is True and sent["add_generation_prompt"] is False
        assert (sent["prompt_logprobs"], sent["max_tokens"]) == (0, 1)
        assert "echo" not in sent and "logprobs" not in sent

        server.calls.clear()
        chat = OpenAIBackend(server.base_url, "m", prompt_format="chat")
        assert chat.score(["Hi"], [" sat"]) == [[-0.25]]  # a string is one user message
        ((path, sent),) = server.calls
        assert path == "/v1/chat/completions" and sent["messages"][0] == prompt[0]


def test_score_over_chat_without_prompt_logprobs_is_a_clear_error() -> None:
    with CompletionsServer(lambda payload: (200, chat_completion("!"))) as server:
        backend = OpenAIBackend(server.base_url, "m", prompt_format="chat")
        with pytest.raises(BackendError, match="use prompt_format raw") as err:
            backend.score(["Hi"], ["there"])
        assert err.value.raw == chat_completion("!")
    # A server that rejects the extension's fields (as `transformers serve` does).
    rejected = '{"detail":"Unexpected fields in the request: {\'prompt_logprobs\'}"}'
    with CompletionsServer(lambda payload: (422, rejected)) as server:
        backend = OpenAIBackend(server.base_url, "m", prompt_format="chat", max_retries=2)
        with pytest.raises(BackendError, match="HTTP 422.*needs vLLM's prompt_logprobs") as err:
            backend.score(["Hi"], ["there"])
        assert err.value.raw == rejected and len(server.calls) == 1


def test_chat_next_token_topk_over_http() -> None:
    body = chat_top_logprobs({"Yes": -0.25, "No": -1.5, "Maybe": -3.0})
    with CompletionsServer(lambda payload: (200, body)) as server:
        backend = OpenAIBackend(server.base_url, "m")
        out = backend.chat_next_token_topk(["Is it?", MESSAGES], k=2)
        assert out == [[TokenLogprob("Yes", -0.25), TokenLogprob("No", -1.5)]] * 2
        sent = {json.dumps(p["messages"]): p for _, p in server.calls}
        assert set(sent) == {
            json.dumps([{"role": "user", "content": "Is it?"}]),
            json.dumps(MESSAGES),
        }
        for path, payload in server.calls:
            assert path == "/v1/chat/completions"
            assert payload["logprobs"] is True and payload["top_logprobs"] == 2
            assert (payload["max_tokens"], payload["temperature"]) == (1, 0.0)
    with pytest.raises(ValueError, match="k must be at least 1"):
        backend.chat_next_token_topk(["x"], k=0)


def test_chat_next_token_topk_without_logprobs_is_a_clear_error() -> None:
    with CompletionsServer(lambda payload: (200, chat_completion("Yes"))) as server:
        backend = OpenAIBackend(server.base_url, "m")
        with pytest.raises(BackendError, match="must return logprobs for chat") as err:
            backend.chat_next_token_topk(["Is it?"], k=3)
        assert err.value.raw == chat_completion("Yes")


def test_next_token_topk_reads_raw_prefixes_even_under_chat() -> None:
    with CompletionsServer(lambda payload: (200, TOPK)) as server:
        backend = OpenAIBackend(server.base_url, "m", prompt_format="chat")
        assert backend.next_token_topk(["The cat"], k=1) == [[TokenLogprob(" sat", -0.9)]]
        ((path, sent),) = server.calls
        assert path == "/v1/completions" and sent["prompt"] == "The cat"


def test_hint_is_only_for_a_rejected_request(sleeps: list[float]) -> None:
    backend = OpenAIBackend(f"http://127.0.0.1:{free_port()}/v1", "m", prompt_format="chat")
    backend.max_retries = 1
    with pytest.raises(BackendError, match="after 2 attempt") as err:
        backend.score(["Hi"], ["there"])
    assert "prompt_logprobs" not in str(err.value)  # the server is down, not lacking
