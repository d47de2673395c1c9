"""Model calls counted per run, per backend and model: what the catalog's
`runs.model_calls` and a run's summary show.

A run opens `counting_calls()`; every backend made while it is open, in the flow or in
one of its tasks (Prefect runs tasks in a copy of the flow's context), adds its
`RequestCounts` to it, and `CallCounts.totals()` sums them per backend and model.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import asdict, dataclass, fields
from typing import Any


@dataclass
class RequestCounts:
    """What a backend sent, for the run's record: requests (an HTTP backend's every
    attempt; an in-process backend's prompts), retries, overload answers, requests that
    failed for good, and tokens (from `usage` over HTTP, counted in process)."""

    requests: int = 0
    retries: int = 0
    status_429: int = 0
    status_503: int = 0
    failed: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    limit_cuts: int = 0
    lowest_limit: int | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class CallCounts:
    """The counts of every backend made during one run."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._made: list[tuple[str, str, RequestCounts]] = []

    def add(self, backend: str, model: str, counts: RequestCounts) -> None:
        with self._lock:
            self._made.append((backend, model, counts))

    def totals(self) -> list[dict[str, Any]]:
        """One dict per backend kind and model: `backend`, `model`, then the summed counts
        (`lowest_limit`: the lowest of any backend's, None when none was cut)."""
        with self._lock:
            made = list(self._made)
        summed: dict[tuple[str, str], dict[str, Any]] = {}
        for backend, model, counts in made:
            total = summed.setdefault(
                (backend, model), {"backend": backend, "model": model, **RequestCounts().as_dict()}
            )
            for f in fields(RequestCounts):
                value = getattr(counts, f.name)
                if f.name == "lowest_limit":
                    if value is not None:
                        low = total["lowest_limit"]
                        total["lowest_limit"] = value if low is None else min(low, value)
                else:
                    total[f.name] += value
        return list(summed.values())


_current: ContextVar[CallCounts | None] = ContextVar("flywheel_call_counts", default=None)


@contextlib.contextmanager
def counting_calls() -> Iterator[CallCounts]:
    """Count the calls of every backend made until the block ends."""
    calls = CallCounts()
    token = _current.set(calls)
    try:
        yield calls
    finally:
        _current.reset(token)


def current_calls() -> CallCounts | None:
    """The counts of the run now open, if any."""
    return _current.get()


def counts_for(backend: str, model: str) -> RequestCounts:
    """Fresh counts for a backend being made, added to the open run's if there is one."""
    counts = RequestCounts()
    if (calls := _current.get()) is not None:
        calls.add(backend, model, counts)
    return counts


def calls_markdown(totals: list[dict[str, Any]]) -> str:
    """The totals as a markdown table, for a run's summary; empty when there are none."""
    if not totals:
        return ""
    columns = [c for c in totals[0] if c not in ("limit_cuts", "lowest_limit")]
    lines = [
        "## Model calls",
        "",
        "| " + " | ".join(columns) + " | limit cuts (lowest) |",
        "|" + "---|" * (len(columns) + 1),
    ]
    for row in totals:
        cuts = f"{row['limit_cuts']} ({row['lowest_limit']})" if row["limit_cuts"] else "0"
        lines.append("| " + " | ".join(str(row[c]) for c in columns) + f" | {cuts} |")
    return "\n".join(lines)
