"""Many HTTP requests in flight from synchronous code: an event loop on a thread of its
own, a concurrency limit that adapts to the server, and counts of what was sent.

The limit follows additive-increase / multiplicative-decrease, as TCP's congestion
control does: an overload answer (429, 503) halves it, at most once per round of
requests started before the cut, and a `Retry-After` pauses every new request until
then; a round whose median latency has risen past `latency_rise` times the best round's
cuts it by a fifth; each success adds `RECOVERY`, so it grows back by about a tenth per
round. Latency is taken per completion token when the server reports usage, so longer
answers alone do not read as a slower server.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import threading
import time
from collections.abc import Coroutine
from typing import Any, TypeVar

from flywheel.llm.usage import RequestCounts

T = TypeVar("T")
RECOVERY = 0.1  # added to the limit per success: about +10% per round
LATENCY_CUT = 0.8


class AdaptiveLimit:
    """How many requests may be in flight now, between 1 and `most`. Used on the event
    loop's thread only."""

    def __init__(self, most: int, counts: RequestCounts, latency_rise: float | None = 3.0):
        if most < 1:
            raise ValueError(f"max_in_flight must be at least 1, got {most}")
        self.most = most
        self.limit = float(most)
        self.counts = counts
        self.latency_rise = latency_rise
        self.in_flight = 0
        self.started = 0
        self.resume_at = 0.0  # time.monotonic() before which no request starts
        self._last_cut = 0  # requests started when the limit was last cut
        self._round: list[float] = []
        self._best_round: float | None = None
        self._changed: asyncio.Condition | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def acquire(self) -> int:
        """Wait for a free place; returns the request's ticket (its start number)."""
        loop = asyncio.get_running_loop()
        if self._changed is None or self._loop is not loop:  # a new loop (closed, forked)
            self._changed, self._loop, self.in_flight = asyncio.Condition(), loop, 0
        async with self._changed:
            while True:
                pause = self.resume_at - time.monotonic()
                if pause > 0:
                    try:
                        await asyncio.wait_for(self._changed.wait(), pause)
                    except TimeoutError:
                        pass
                elif self.in_flight < int(self.limit):
                    break
                else:
                    await self._changed.wait()
            self.in_flight += 1
            self.started += 1
            return self.started

    async def release(
        self,
        ticket: int,
        *,
        overloaded: bool = False,
        retry_after: float | None = None,
        seconds: float | None = None,
    ) -> None:
        """A request is done: `overloaded` when the server said 429 or 503, `seconds` its
        latency (per completion token where known) when it succeeded."""
        assert self._changed is not None
        async with self._changed:
            self.in_flight -= 1
            if overloaded:
                self._cut(ticket, 0.5)
                if retry_after:
                    self.resume_at = max(self.resume_at, time.monotonic() + retry_after)
            elif seconds is not None:
                self.limit = min(float(self.most), self.limit + RECOVERY)
                self._observe(ticket, seconds)
            self._changed.notify_all()

    def _cut(self, ticket: int, factor: float) -> None:
        if ticket <= self._last_cut:  # started before the last cut: it saw the old limit
            return
        self.limit = max(1.0, self.limit * factor)
        self._last_cut = self.started
        self._round.clear()
        self.counts.limit_cuts += 1
        lowest = self.counts.lowest_limit
        self.counts.lowest_limit = min(int(self.limit), lowest or self.most)

    def _observe(self, ticket: int, seconds: float) -> None:
        if self.latency_rise is None:
            return
        self._round.append(seconds)
        if len(self._round) < max(8, int(self.limit)):
            return
        median = statistics.median(self._round)
        self._round.clear()
        if self._best_round is None or median < self._best_round:
            self._best_round = median
        elif median > self.latency_rise * self._best_round:
            self._cut(ticket, LATENCY_CUT)


class LoopThread:
    """An event loop running on a daemon thread, so synchronous callers (with or without
    a running loop of their own, in any thread) can run coroutines on it and wait. Made
    again in a forked child, where the parent's thread does not exist."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._pid: int | None = None
        self._lock = threading.Lock()
        self.loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    def run(self, work: Coroutine[Any, Any, T]) -> T:
        loop = self._started()
        if threading.current_thread() is self._thread:
            work.close()
            raise RuntimeError(f"{self.name}: called from its own event loop thread")
        return asyncio.run_coroutine_threadsafe(work, loop).result()

    def _started(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self.loop is None or self._pid != os.getpid():
                self.loop = asyncio.new_event_loop()
                self._thread = threading.Thread(
                    target=self.loop.run_forever, name=self.name, daemon=True
                )
                self._thread.start()
                self._pid = os.getpid()
            return self.loop

    def stop(self, last: Coroutine[Any, Any, Any] | None = None) -> None:
        """Run `last` (e.g. closing a client) on the loop, then stop the thread."""
        with self._lock:
            loop, thread, self.loop = self.loop, self._thread, None
        if loop is None or self._pid != os.getpid():
            if last is not None:
                last.close()
            return
        if last is not None:
            asyncio.run_coroutine_threadsafe(last, loop).result()
        loop.call_soon_threadsafe(loop.stop)
        assert thread is not None
        thread.join()
        loop.close()
