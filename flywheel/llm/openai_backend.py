"""Backend over HTTP to any OpenAI-compatible server (vLLM, `transformers serve`).

A string prompt goes to `/v1/completions` as it is (prompt format `raw` or `auto`); chat
messages, and any prompt under prompt format `chat` (a string as one user message), go
to `/v1/chat/completions`, where the server renders them with the model's chat template.

Log-probs follow vLLM's formats:

- completions: `choices[i].logprobs = {tokens, token_logprobs, top_logprobs,
  text_offset}`, where `top_logprobs` holds one `{token: logprob}` dict per token and,
  with `echo: true`, the prompt's tokens come first with offsets into the echoed text;
- chat (OpenAI's format): `choices[i].logprobs.content = [{token, logprob, bytes,
  top_logprobs: [{token, logprob, bytes}, ...]}, ...]`, one entry per generated token;
- chat prompt log-probs (a vLLM extension, requested with `prompt_logprobs`): a
  top-level `prompt_logprobs` list with one entry per prompt token, `null` for the first,
  each a `{token_id: {logprob, rank, decoded_token}}` dict.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import os
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
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
from flywheel.llm.chat import Message, Prompt, PromptFormat, as_text_value, to_messages
from flywheel.llm.inflight import AdaptiveLimit, LoopThread
from flywheel.llm.usage import counts_for

if TYPE_CHECKING:
    from flywheel.llm.managed_server import ManagedServer

T = TypeVar("T")
RETRY_STATUS = {429, 500, 502, 503, 504}
OVERLOAD_STATUS = {429, 503}  # the server asks for fewer requests: retried on their own budget
MAX_OVERLOAD_WAIT_S = 30.0
pause = asyncio.sleep  # the backoff between attempts (tests record it instead)
PROMPT_FORMATS = ("auto", "raw", "chat")
COMPLETIONS, CHAT = "/completions", "/chat/completions"
CHAT_LOGPROBS_HINT = "the server must return logprobs for chat; vLLM does"
CHAT_SCORE_HINT = (
    "scoring over chat needs vLLM's prompt_logprobs; use prompt_format raw against "
    "/v1/completions otherwise"
)


def _body(raw: str, what: str) -> Any:
    try:
        return json.loads(raw)
    except ValueError as e:
        raise MalformedResponse(f"malformed {what} response: {e!r}", raw=raw) from e


def retry_after(resp: httpx.Response) -> float | None:
    """Seconds the server asks to wait (`Retry-After`: seconds or an HTTP date), or None."""
    value = resp.headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


def usage_tokens(raw: str) -> tuple[int, int]:
    """(prompt_tokens, completion_tokens) from a body's `usage`; (0, 0) without one."""
    try:
        usage = json.loads(raw).get("usage") or {}
        return int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0)
    except (ValueError, AttributeError, TypeError):
        return 0, 0


def _first_choice(raw: str, what: str = "completions") -> dict[str, Any]:
    try:
        choice = _body(raw, what)["choices"][0]
    except (KeyError, IndexError, TypeError) as e:
        raise MalformedResponse(f"malformed {what} response: {e!r}", raw=raw) from e
    if not isinstance(choice, dict):
        raise MalformedResponse(f"malformed {what} response: choice is not an object", raw=raw)
    return choice


def parse_text(raw: str) -> str:
    """The generated text of the first choice of a completions body."""
    text = _first_choice(raw).get("text")
    if not isinstance(text, str):
        raise MalformedResponse("completions response has no choices[0].text string", raw=raw)
    return text


def parse_chat_text(raw: str) -> str:
    """The assistant's text of the first choice of a chat completions body; a `null`
    content (a refusal, a tool call) is no text either."""
    message = _first_choice(raw, "chat completions").get("message")
    content = message.get("content") if isinstance(message, dict) else None
    if not isinstance(content, str):
        raise MalformedResponse(
            "chat completions response has no choices[0].message.content string", raw=raw
        )
    return content


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


def parse_chat_top_logprobs(raw: str, k: int) -> list[TokenLogprob]:
    """The first generated token's top-k candidates of a chat body (OpenAI's format:
    `choices[0].logprobs.content[0].top_logprobs = [{token, logprob, bytes}, ...]`),
    sorted by logprob descending."""
    logprobs = _first_choice(raw, "chat completions").get("logprobs")
    try:
        top = logprobs["content"][0]["top_logprobs"]
        items = [TokenLogprob(str(c["token"]), float(c["logprob"])) for c in top]
        if not items:
            raise ValueError("top_logprobs is empty")
    except (KeyError, IndexError, TypeError, ValueError) as e:
        raise BackendError(
            f"chat completions response has no choices[0].logprobs.content[0].top_logprobs "
            f"({e!r}); {CHAT_LOGPROBS_HINT}",
            raw=raw,
        ) from e
    # vLLM lists the sampled token first, then the most likely ones: sort, then cut.
    return sorted(items, key=lambda t: t.logprob, reverse=True)[:k]


def parse_prompt_logprobs(raw: str, completion: str) -> list[float]:
    """Log-probs of the completion's tokens at the end of a chat prompt, from vLLM's
    top-level `prompt_logprobs`.

    Each position is a `{token_id: {logprob, rank, decoded_token}}` dict (vLLM's
    `ChatCompletionResponse.prompt_logprobs: list[dict[int, Logprob] | None]`, in
    vllm/entrypoints/openai/chat_completion/protocol.py). vLLM puts the prompt's own
    token first, with its rank in the whole vocabulary, then the top-k with ranks 1..k,
    merged with it when it is one of them (`append_logprobs_for_next_position` in
    vllm/logprobs.py): no rank marks it, its place does. We ask for `prompt_logprobs: 0`,
    so it is the only entry; the first is taken either way. `decoded_token` is
    `tokenizer.decode([token_id])` (`convert_ids_list_to_tokens`, vllm's
    detokenizer_utils.py), so the completion's tokens' texts concatenate to its text:
    it is the shortest tail of positions whose texts end with it (a first token merged
    with the template text before it counts whole).
    """
    body = _body(raw, "chat completions")
    positions = body.get("prompt_logprobs") if isinstance(body, dict) else None
    if not isinstance(positions, list) or not positions:
        raise BackendError(
            f"chat completions response has no prompt_logprobs; {CHAT_SCORE_HINT}", raw=raw
        )
    picked: list[float] = []
    tail = ""
    for index in range(len(positions) - 1, 0, -1):  # position 0 has no logprob
        entry = positions[index]
        try:
            first = next(iter(entry.values()))
            text, logprob = first["decoded_token"], float(first["logprob"])
            if not isinstance(text, str):
                raise TypeError(f"decoded_token is {text!r}")
        except (AttributeError, StopIteration, KeyError, TypeError, ValueError) as e:
            raise BackendError(
                f"chat completions response: prompt_logprobs[{index}] is not a "
                f"{{token_id: {{logprob, rank, decoded_token}}}} entry ({e!r})",
                raw=raw,
            ) from e
        picked.append(logprob)
        tail = text + tail
        if tail.endswith(completion):
            return picked[::-1]
        if len(tail) >= len(completion):
            break  # the tail's end no longer changes: the completion is not there
    raise BackendError(
        f"the completion {completion[:60]!r} is not the end of the prompt tokens the server "
        f"scored (they end with {tail[-60:]!r}); the chat template may have changed it, "
        "e.g. stripped its leading or trailing whitespace",
        raw=raw,
    )


class OpenAIBackend(Backend):
    """Talks to an OpenAI-compatible server, keeping up to `max_in_flight` requests in
    flight (one connection each), and retries transient failures with backoff.

    Each prompt is its own request: `transformers serve` rejects list prompts ("prompt
    must be a string"), and vLLM batches concurrent requests itself. The requests run on
    an event loop of the backend's own (`flywheel.llm.inflight`), so the methods work
    from any thread, inside or outside a running event loop. The number in flight adapts:
    a 429 or 503 halves it and a `Retry-After` pauses new requests until then; a rise in
    latency past `latency_rise` times the best (None: never) lowers it; successes bring it
    back. Overload answers are retried up to `overload_retries` times, other transient
    failures (no connection, 500, 502, 504) up to `max_retries`. `counts` records
    requests, retries, 429s and 503s, failures and tokens (from `usage`).

    A body that is not a completions answer raises `MalformedResponse` (not retried: the
    server did answer); `call_each` gives callers each prompt's own result or error.

    `prompt_format` `auto` and `raw` send string prompts to `/completions`; `chat` sends
    them to `/chat/completions` as one user message. Chat messages always go as chat.
    `next_token_topk` reads its prefixes as raw text (decoders continue text they
    rendered) and stays on `/completions`; `chat_next_token_topk` asks over chat.
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        api_key: str | None = None,
        timeout: float = 60,
        max_retries: int = 4,
        overload_retries: int = 30,
        backoff: float = 0.5,
        max_in_flight: int = 256,
        latency_rise: float | None = 3.0,
        prompt_format: PromptFormat = "auto",
        server: ManagedServer | None = None,
    ) -> None:
        if prompt_format not in PROMPT_FORMATS:
            raise ValueError(
                f"prompt_format {prompt_format!r} is not one of {PROMPT_FORMATS} "
                "(field: prompt_format)"
            )
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.max_retries = max_retries
        self.overload_retries = overload_retries
        self.backoff = backoff
        self.max_in_flight = max_in_flight
        self.prompt_format = prompt_format
        self.server = server  # stopped by close() when this backend started it
        # the run open now (if any) sums these into its record
        self.counts = counts_for("vllm" if server is not None else "openai", model)
        self._limit = AdaptiveLimit(max_in_flight, self.counts, latency_rise)
        self._timeout = timeout
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._loop = LoopThread(f"flywheel-http {model}")
        self._client: httpx.AsyncClient | None = None
        self._client_pid: int | None = None

    def _http(self) -> httpx.AsyncClient:
        """The client, made on the loop's thread (it belongs to that loop), again after a
        fork; its pool holds a connection per request in flight."""
        if self._client is None or self._client_pid != os.getpid():
            self._client = httpx.AsyncClient(
                base_url=self.base_url,
                timeout=self._timeout,
                headers=self._headers,
                limits=httpx.Limits(
                    max_connections=self.max_in_flight,
                    max_keepalive_connections=self.max_in_flight,
                ),
            )
            self._client_pid = os.getpid()
        return self._client

    async def _post(self, path: str, payload: dict[str, Any], hint: str = "") -> str:
        """POST to `path` and return the body text, retrying transient failures; `hint`
        is added to the error when the server rejects the request (a 4xx)."""
        payload = {"model": self.model, **payload}
        client, counts = self._http(), self.counts
        rejected, failures, overloads, attempt = False, 0, 0, 0
        while True:
            attempt += 1
            ticket = await self._limit.acquire()
            sent = time.monotonic()
            counts.requests += 1
            try:
                resp = await client.post(path, json=payload)
            except httpx.TransportError as e:
                await self._limit.release(ticket)
                error, raw, status = f"{type(e).__name__}: {e}", None, None
            else:
                status = resp.status_code
                if status == 200:
                    prompt_tokens, completion_tokens = usage_tokens(resp.text)
                    counts.prompt_tokens += prompt_tokens
                    counts.completion_tokens += completion_tokens
                    seconds = (time.monotonic() - sent) / max(1, completion_tokens)
                    await self._limit.release(ticket, seconds=seconds)
                    return resp.text
                wait = retry_after(resp) if status in OVERLOAD_STATUS else None
                await self._limit.release(
                    ticket, overloaded=status in OVERLOAD_STATUS, retry_after=wait
                )
                error, raw = f"HTTP {status}", resp.text
                counts.status_429 += status == 429
                counts.status_503 += status == 503
                if status not in RETRY_STATUS:
                    rejected = 400 <= status < 500
                    break
            if status in OVERLOAD_STATUS:
                overloads += 1
                if overloads > self.overload_retries:
                    break
                if wait is None:  # no Retry-After: back off on our own
                    step = min(MAX_OVERLOAD_WAIT_S, self.backoff * 2 ** min(overloads - 1, 16))
                    await pause(step + random.uniform(0, self.backoff))
            else:
                failures += 1
                if failures > self.max_retries:
                    break
                await pause(self.backoff * 2 ** (failures - 1) + random.uniform(0, self.backoff))
            counts.retries += 1
        counts.failed += 1
        raise BackendError(
            f"POST {self.base_url}{path} failed after {attempt} attempt(s): {error}"
            + (f"; {hint}" if hint and rejected else ""),
            raw=raw,
        )

    def _map(self, fn: Callable[[int], Awaitable[T]], n: int) -> list[T]:
        """`fn` for 0..n-1, all submitted at once (the limit paces them); the results in
        order, or the error of the first item that failed once all have ended."""

        async def every() -> list[T]:
            done = await asyncio.gather(*(fn(i) for i in range(n)), return_exceptions=True)
            for item in done:
                if isinstance(item, BaseException):
                    raise item
            return done  # type: ignore[return-value]

        return self._loop.run(every()) if n else []

    def _messages(self, prompt: Prompt, i: int) -> list[Message] | None:
        """The chat messages a prompt is sent as, or None when it goes as raw text.
        Checked before any request, so a bad prompt fails the call up front."""
        if isinstance(prompt, str) and self.prompt_format != "chat":
            return None
        return to_messages(as_text_value(prompt, where=f"prompt {i}"))

    def generate(
        self,
        prompts: Sequence[Prompt],
        *,
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        stop: Sequence[str] | None = None,
        seed: int | None = None,
        json_schema: dict[str, Any] | None = None,
    ) -> list[str]:
        """New text per prompt; stop strings are also cut here in case the server ignores
        them. `json_schema` asks the server to constrain the output to that schema."""
        payload: dict[str, Any] = {"max_tokens": max_new_tokens, "temperature": temperature}
        if stop:
            payload["stop"] = list(stop)
        if seed is not None:
            payload["seed"] = seed
        messages = [self._messages(p, i) for i, p in enumerate(prompts)]

        async def one(i: int) -> str:
            if messages[i] is None:
                body = {**payload, "prompt": prompts[i]}
                if json_schema is not None:
                    # vLLM's structured outputs on /completions; `guided_json` was
                    # removed in v0.12.0 (docs.vllm.ai/en/latest/features/structured_outputs).
                    body["structured_outputs"] = {"json": json_schema}
                text = parse_text(await self._post(COMPLETIONS, body))
            else:
                body = {**payload, "messages": messages[i]}
                if json_schema is not None:  # OpenAI's structured outputs, which vLLM takes
                    body["response_format"] = {
                        "type": "json_schema",
                        "json_schema": {"name": "answer", "schema": json_schema},
                    }
                text = parse_chat_text(await self._post(CHAT, body))
            return cut_at_stop(text, stop)

        return self._map(one, len(prompts))

    def score(self, prompts: Sequence[Prompt], completions: Sequence[str]) -> list[list[float]]:
        """Log-probs of each completion's tokens given its prompt. Raw text: echo prompt
        + completion on /completions and keep the completion's offsets. Chat: send the
        completion as the assistant's open final message and read vLLM's prompt_logprobs."""
        check_pairs(prompts, completions)
        messages = [self._messages(p, i) for i, p in enumerate(prompts)]

        async def one(i: int) -> list[float]:
            prompt, completion = prompts[i], completions[i]
            if not completion:
                return []
            if messages[i] is None:
                assert isinstance(prompt, str)  # only strings go as raw text
                text = prompt + completion
                # max_tokens 1, not 0: not every server accepts 0; the extra token is
                # past the completion's end and is dropped by the offsets.
                payload = {"prompt": text, "echo": True, "logprobs": 0, "max_tokens": 1}
                raw = await self._post(COMPLETIONS, {**payload, "temperature": 0.0})
                return parse_span_logprobs(raw, len(prompt), len(text))
            payload = {
                "messages": [*messages[i], {"role": "assistant", "content": completion}],
                # the answer stays open, as the model would write it: no end-of-turn
                "continue_final_message": True,
                "add_generation_prompt": False,
                "prompt_logprobs": 0,
                "max_tokens": 1,
                "temperature": 0.0,
            }
            raw = await self._post(CHAT, payload, hint=CHAT_SCORE_HINT)
            return parse_prompt_logprobs(raw, completion)

        return self._map(one, len(prompts))

    def next_token_topk(self, prefixes: Sequence[str], k: int = 5) -> list[list[TokenLogprob]]:
        """Top-k candidates for the first generated token after each raw-text prefix."""

        async def one(i: int) -> list[TokenLogprob]:
            payload = {"prompt": prefixes[i], "max_tokens": 1, "logprobs": k, "temperature": 0.0}
            return parse_top_logprobs(await self._post(COMPLETIONS, payload), k)

        return self._map(one, len(prefixes))

    def chat_next_token_topk(
        self, prompts: Sequence[Prompt], k: int = 5
    ) -> list[list[TokenLogprob]]:
        """Top-k candidates for the assistant's first token after each chat prompt (a
        string is one user message), sorted by logprob descending."""
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        messages = [
            to_messages(as_text_value(p, where=f"prompt {i}")) for i, p in enumerate(prompts)
        ]

        async def one(i: int) -> list[TokenLogprob]:
            # Greedy: vLLM's chat top_logprobs are a position's first k entries, the
            # sampled token first (`_get_top_logprobs` in vllm/entrypoints/openai/
            # chat_completion/serving.py), so the sampled token must be the top one.
            payload = {
                "messages": messages[i],
                "max_tokens": 1,
                "logprobs": True,
                "top_logprobs": k,
                "temperature": 0.0,
            }
            raw = await self._post(CHAT, payload, hint=CHAT_LOGPROBS_HINT)
            return parse_chat_top_logprobs(raw, k)

        return self._map(one, len(prompts))

    def close(self) -> None:
        """Close the HTTP client and the loop's thread, and stop the managed server, if any."""
        client, self._client = self._client, None
        self._loop.stop(client.aclose() if client is not None else None)
        if self.server is not None:
            self.server.stop()
