"""The interface every model backend implements, and its errors."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import NamedTuple, Self, TypeVar

T = TypeVar("T")
R = TypeVar("R")


class TokenLogprob(NamedTuple):
    """One candidate next token and its log-probability."""

    token: str
    logprob: float


class BackendError(RuntimeError):
    """A backend call failed; `raw` holds the raw response text when there was one."""

    def __init__(self, message: str, raw: str | None = None) -> None:
        super().__init__(message)
        self.raw = raw


class MalformedResponse(BackendError):
    """The server answered one request, but not with a usable completion (a body that is
    not JSON, no `choices`, no text); `raw` holds the body. Unlike a server that cannot be
    reached, this fails that request only: the others of its batch may be fine."""


class ServerNeverCameUp(BackendError):
    """A managed model server exited or timed out before it became healthy."""


class ModelNotFound(BackendError):
    """The model is neither an existing folder nor available locally."""


class Backend(ABC):
    """Generate, score and inspect next-token distributions for many prompts at once."""

    model: str

    @abstractmethod
    def generate(
        self,
        prompts: Sequence[str],
        *,
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        stop: Sequence[str] | None = None,
        seed: int | None = None,
    ) -> list[str]:
        """The new text for each prompt, cut at EOS and at the first stop string."""

    @abstractmethod
    def score(self, prompts: Sequence[str], completions: Sequence[str]) -> list[list[float]]:
        """Per-token log-probs of each completion given its prompt."""

    @abstractmethod
    def next_token_topk(self, prefixes: Sequence[str], k: int = 5) -> list[list[TokenLogprob]]:
        """The k most likely next tokens after each prefix, sorted by logprob descending."""

    def close(self) -> None:  # noqa: B027 - optional for backends holding nothing
        """Release resources (models, connections, servers)."""

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def call_each(
    call: Callable[[list[T]], Sequence[R]], items: Sequence[T]
) -> list[R | MalformedResponse]:
    """`call` over all items, with each item's own MalformedResponse in place of its result.

    One batched call; only when it raises MalformedResponse is each item asked alone, so
    one malformed answer costs the others a second request, not their results. Other
    errors (a server gone, after the backend's own retries) propagate.
    """
    try:
        return list(call(list(items)))
    except MalformedResponse as err:
        if len(items) == 1:
            return [err]
    results: list[R | MalformedResponse] = []
    for item in items:
        try:
            results.extend(call([item]))
        except MalformedResponse as err:
            results.append(err)
    return results


def cut_at_stop(text: str, stop: Sequence[str] | None) -> str:
    """Cut `text` at the earliest occurrence of any stop string (the stop string excluded)."""
    if not stop:
        return text
    cut = min((i for s in stop if s and (i := text.find(s)) >= 0), default=len(text))
    return text[:cut]


def check_pairs(prompts: Sequence[str], completions: Sequence[str]) -> None:
    if len(prompts) != len(completions):
        raise ValueError(
            f"score needs one completion per prompt, got {len(prompts)} prompts "
            f"and {len(completions)} completions"
        )
