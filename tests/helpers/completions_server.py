"""A local stand-in for an OpenAI-compatible server (`/v1/completions` and
`/v1/chat/completions`) whose answer to each request is a function of the request, so a test
can make some prompts' answers malformed; and bodies in vLLM's formats to answer with."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Self

Reply = tuple[int, str]  # (HTTP status, body)


def completion(text: str) -> str:
    """A well-formed completions body whose first choice's text is `text`."""
    return json.dumps({"choices": [{"index": 0, "text": text, "finish_reason": "stop"}]})


def top_logprobs(candidates: dict[str, float]) -> str:
    """A well-formed completions body (vLLM format) whose first position has `candidates`."""
    first = max(candidates, key=candidates.__getitem__)
    logprobs = {"tokens": [first], "token_logprobs": [candidates[first]]}
    logprobs |= {"top_logprobs": [candidates], "text_offset": [0]}
    return json.dumps({"choices": [{"index": 0, "text": first, "logprobs": logprobs}]})


def chat_completion(content: str | None) -> str:
    """A chat completions body whose first choice's message has `content`."""
    message = {"role": "assistant", "content": content}
    return json.dumps({"choices": [{"index": 0, "message": message, "finish_reason": "stop"}]})


def _token_bytes(token: str) -> list[int]:
    return list(token.encode())


def chat_top_logprobs(candidates: dict[str, float]) -> str:
    """A chat completions body in vLLM's (OpenAI's) format whose one generated token has
    `candidates` as its top_logprobs; the sampled (greedy) token is listed first."""
    first = max(candidates, key=candidates.__getitem__)
    others = [t for t in candidates if t != first]
    top = [
        {"token": t, "logprob": candidates[t], "bytes": _token_bytes(t)} for t in [first, *others]
    ]
    content = [
        {
            "token": first,
            "logprob": candidates[first],
            "bytes": _token_bytes(first),
            "top_logprobs": top,
        }
    ]
    choice = {
        "index": 0,
        "message": {"role": "assistant", "content": first},
        "logprobs": {"content": content},
        "finish_reason": "length",
    }
    return json.dumps({"choices": [choice]})


def chat_prompt_logprobs(tokens: list[tuple[str, float]], generated: str = "!") -> str:
    """A chat completions body with vLLM's top-level `prompt_logprobs` for a prompt of
    `tokens` ((decoded text, logprob) each): `null` for the first, then one
    `{token_id: {logprob, rank, decoded_token}}` dict per token (prompt_logprobs 0)."""
    positions: list[dict | None] = [None]
    for token_id, (text, logprob) in enumerate(tokens[1:], start=100):
        entry = {"logprob": logprob, "rank": 1 + token_id % 7, "decoded_token": text}
        positions.append({str(token_id): entry})
    choice = {"index": 0, "message": {"role": "assistant", "content": generated}}
    return json.dumps({"choices": [choice], "prompt_logprobs": positions})


class _Server(ThreadingHTTPServer):
    # the default backlog (5) drops connections when a backend opens dozens at once
    request_queue_size = 128


class CompletionsServer:
    """Answers each POSTed JSON payload with `answer(payload)`; records every payload, and
    in `calls` each (path, payload)."""

    def __init__(self, answer: Callable[[dict], Reply]) -> None:
        self.requests: list[dict] = []
        self.calls: list[tuple[str, dict]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                payload = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.requests.append(payload)
                outer.calls.append((self.path, payload))
                status, body = answer(payload)
                data = body.encode()
                self.send_response(status)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = _Server(("127.0.0.1", 0), Handler)
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self._thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self._thread.start()

    def prompts(self) -> list[str]:
        return [r["prompt"] for r in self.requests]

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self._thread.join()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
