"""Backend over HTTP to any OpenAI-compatible `/v1/completions` server (vLLM, `transformers serve`).

Log-probs use vLLM's completions format: `choices[i].logprobs = {tokens,
token_logprobs, top_logprobs, text_offset}`, where `top_logprobs` holds one
`{token: logprob}` dict per token and, with `echo: true`, the prompt's tokens
come first with offsets into the echoed text.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, TypeVar

import httpx

from flywheel.llm.base import (
    Backend,
    BackendError,
    MalformedResponse,
    TokenLogprob,
    check_pairs,
    cut_at_stop,
)

if TYPE_CHECKING:
    from flywheel.llm.managed_server import ManagedServer

T = TypeVar("T")
RETRY_STATUS = {429, 500, 502, 503, 504}


def _first_choice(raw: str) -> dict[str, Any]:
    try:
        choice = json.loads(raw)["choices"][0]
    except (ValueError, KeyError, IndexError, TypeError) as e:
        raise MalformedResponse(f"malformed completions response: {e!r}", raw=raw) from e
    if not isinstance(choice, dict):
        raise MalformedResponse("malformed completions response: choice is not an object", raw=raw)
    return choice


def parse_text(raw: str) -> str:
    """The generated text of the first choice."""
    text = _first_choice(raw).get("text")
    if not isinstance(text, str):
        raise MalformedResponse("completions response has no choices[0].text string", raw=raw)
    return text


def parse_span_logprobs(raw: str, start: int, end: int) -> list[float]:
    """Log-probs of the echoed tokens whose text_offset lies in [start, end).

    A token that straddles `start` (the server merged the prompt's end with the
    completion's start) is left out.
    """
    logprobs = _first_choice(raw).get("logprobs")
    try:
        offsets, values = logprobs["text_offset"], logprobs["token_logprobs"]
        if len(offsets) != len(values):
            raise ValueError("text_offset and token_logprobs differ in length")
        picked = [float(v) for o, v in zip(offsets, values, strict=True) if start <= o < end]
    except (KeyError, TypeError, ValueError) as e:
        raise BackendError(
            f"completions response has no usable prompt logprobs ({e!r}); the server must "
            "support `echo` with `logprobs` (vLLM does, `transformers serve` does not)",
            raw=raw,
        ) from e
    if end > start and not picked:
        raise BackendError("completions response has no logprobs for the completion", raw=raw)
    return picked


def parse_top_logprobs(raw: str, k: int) -> list[TokenLogprob]:
    """The first generated position's top-k candidates, sorted by logprob descending."""
    logprobs = _first_choice(raw).get("logprobs")
    try:
        top = logprobs["top_logprobs"][0]
        items = [TokenLogprob(str(t), float(v)) for t, v in top.items()]
    except (KeyError, IndexError, TypeError, ValueError, AttributeError) as e:
        raise BackendError(
            f"completions response has no top_logprobs ({e!r}); the server must support "
            "`logprobs` (vLLM does, `transformers serve` does not)",
            raw=raw,
        ) from e
    # vLLM may add the sampled token as a (k+1)-th entry.
    return sorted(items, key=lambda t: t.logprob, reverse=True)[:k]


class OpenAIBackend(Backend):
    """Talks to an OpenAI-compatible server; retries transient failures with backoff.

    Each prompt is its own request, sent concurrently (`batch_size` at a time):
    `transformers serve` rejects list prompts ("prompt must be a string"), and
    vLLM batches concurrent requests itself. A body that is not a completions answer
    raises `MalformedResponse` (not retried: the server did answer); `call_each` gives
    callers each prompt's own result or error.
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        api_key: str | None = None,
        timeout: float = 60,
        max_retries: int = 4,
        backoff: float = 0.5,
        batch_size: int = 16,
        server: ManagedServer | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.max_retries = max_retries
        self.backoff = backoff
        self.batch_size = batch_size
        self.server = server  # stopped by close() when this backend started it
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._client = httpx.Client(base_url=self.base_url, timeout=timeout, headers=headers)

    def _post(self, payload: dict[str, Any]) -> str:
        """POST to /completions and return the body text, retrying transient failures."""
        payload = {"model": self.model, **payload}
        for attempt in range(self.max_retries + 1):
            try:
                resp = self._client.post("/completions", json=payload)
            except httpx.TransportError as e:
                error, raw = f"{type(e).__name__}: {e}", None
            else:
                if resp.status_code == 200:
                    return resp.text
                error, raw = f"HTTP {resp.status_code}", resp.text
                if resp.status_code not in RETRY_STATUS:
                    break
            if attempt < self.max_retries:
                time.sleep(self.backoff * 2**attempt + random.uniform(0, self.backoff))
        raise BackendError(
            f"POST {self.base_url}/completions failed after {attempt + 1} attempt(s): {error}",
            raw=raw,
        )

    def _map(self, fn: Callable[[int], T], n: int) -> list[T]:
        if n <= 1:
            return [fn(i) for i in range(n)]
        with ThreadPoolExecutor(max_workers=min(self.batch_size, n)) as pool:
            return list(pool.map(fn, range(n)))

    def generate(
        self,
        prompts: Sequence[str],
        *,
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        stop: Sequence[str] | None = None,
        seed: int | None = None,
    ) -> list[str]:
        """New text per prompt; stop strings are also cut here in case the server ignores them."""
        payload: dict[str, Any] = {"max_tokens": max_new_tokens, "temperature": temperature}
        if stop:
            payload["stop"] = list(stop)
        if seed is not None:
            payload["seed"] = seed

        def one(i: int) -> str:
            return cut_at_stop(parse_text(self._post({**payload, "prompt": prompts[i]})), stop)

        return self._map(one, len(prompts))

    def score(self, prompts: Sequence[str], completions: Sequence[str]) -> list[list[float]]:
        """Echo prompt + completion with logprobs and keep the completion's tokens."""
        check_pairs(prompts, completions)

        def one(i: int) -> list[float]:
            prompt, completion = prompts[i], completions[i]
            if not completion:
                return []
            text = prompt + completion
            # max_tokens 1, not 0: not every server accepts 0; the extra token is
            # past the completion's end and is dropped by the offsets.
            payload = {"prompt": text, "echo": True, "logprobs": 0, "max_tokens": 1}
            raw = self._post({**payload, "temperature": 0.0})
            return parse_span_logprobs(raw, len(prompt), len(text))

        return self._map(one, len(prompts))

    def next_token_topk(self, prefixes: Sequence[str], k: int = 5) -> list[list[TokenLogprob]]:
        """Top-k candidates for the first generated token after each prefix."""

        def one(i: int) -> list[TokenLogprob]:
            payload = {"prompt": prefixes[i], "max_tokens": 1, "logprobs": k, "temperature": 0.0}
            return parse_top_logprobs(self._post(payload), k)

        return self._map(one, len(prefixes))

    def close(self) -> None:
        """Close the HTTP client and stop the managed server, if any."""
        self._client.close()
        if self.server is not None:
            self.server.stop()
