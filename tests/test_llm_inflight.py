"""The HTTP backend keeps many requests in flight and adapts to an overloaded server,
against a real local server that holds each request a while and counts how many it is
holding at once."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator

import pytest

from flywheel.llm import OpenAIBackend
from flywheel.llm.spec import BackendSpec
from flywheel.llm.usage import CallCounts, RequestCounts, calls_markdown, counting_calls
from tests.helpers.holding_server import Holding


@pytest.fixture
def holding() -> Iterator[type[Holding]]:
    servers: list[Holding] = []

    def make(*args, **kwargs) -> Holding:
        servers.append(Holding(*args, **kwargs))
        return servers[-1]

    yield make
    for server in servers:
        server.close()


def test_many_requests_in_flight_never_more_than_the_limit(holding) -> None:
    server = holding(hold=0.3)
    prompts = [f"p{i}" for i in range(96)]
    with OpenAIBackend(server.base_url, "m", max_in_flight=32) as backend:
        out = backend.generate(prompts)
        counts = backend.counts
    assert out == [f"<{p}>" for p in prompts]
    # 96 requests held 0.3 s each: a backend sending a handful at a time peaks low
    assert 16 <= server.peak <= 32
    assert (counts.requests, counts.retries, counts.failed) == (96, 0, 0)
    assert (counts.prompt_tokens, counts.completion_tokens) == (96 * 3, 96 * 2)


def test_an_overloaded_server_gets_fewer_requests_and_every_one_finishes(holding) -> None:
    server = holding(hold=0.05, capacity=4)
    prompts = [f"p{i}" for i in range(60)]
    with OpenAIBackend(server.base_url, "m", max_in_flight=32, backoff=0.02) as backend:
        out = backend.generate(prompts)
        counts = backend.counts
    assert out == [f"<{p}>" for p in prompts]
    assert counts.failed == 0 and counts.status_429 == len(server.rejections) > 0
    assert counts.requests == 60 + counts.status_429 and counts.retries == counts.status_429
    assert counts.limit_cuts >= 1 and counts.lowest_limit is not None
    assert counts.lowest_limit < 32


def test_retry_after_holds_back_the_next_attempt(holding) -> None:
    server = holding(hold=0.2, capacity=1, retry_after=1)
    with OpenAIBackend(server.base_url, "m", max_in_flight=2, backoff=0.01) as backend:
        out = backend.generate(["a", "b"])
    assert out == ["<a>", "<b>"]
    assert len(server.rejections) >= 1
    first_rejection = server.rejections[0]
    later = [t for t in server.arrivals if t > first_rejection]
    assert later and min(later) - first_rejection >= 0.9  # the server asked for 1 s


def test_works_from_inside_a_running_event_loop_and_from_threads(holding) -> None:
    server = holding(hold=0.01)
    with OpenAIBackend(server.base_url, "m", max_in_flight=8) as backend:

        async def inside() -> list[str]:
            return backend.generate(["x", "y"])

        assert asyncio.run(inside()) == ["<x>", "<y>"]
        results: dict[int, list[str]] = {}
        threads = [
            threading.Thread(target=lambda i=i: results.update({i: backend.generate([f"t{i}"])}))
            for i in range(4)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert results == {i: [f"<t{i}>"] for i in range(4)}
    with pytest.raises(ValueError, match="max_in_flight must be at least 1"):
        OpenAIBackend(server.base_url, "m", max_in_flight=0)


def test_batch_size_on_an_http_spec_points_at_max_in_flight() -> None:
    with pytest.raises(ValueError, match="set max_in_flight"):
        BackendSpec(kind="openai", model="m", base_url="http://127.0.0.1:1/v1", batch_size=8)
    spec = BackendSpec(kind="openai", model="m", base_url="http://127.0.0.1:1/v1")
    assert spec.max_in_flight == 256
    # flow parameters are dumped and read back: an HTTP spec must survive the round trip
    dumped = spec.model_dump(mode="json")
    assert BackendSpec.model_validate(dumped) == spec
    assert BackendSpec.model_validate_json(spec.model_dump_json()) == spec


def test_a_runs_counts_sum_its_backends_per_model_and_leave_out_others(holding) -> None:
    server = holding(hold=0.01)
    outside = OpenAIBackend(server.base_url, "m")  # made before the run: not its calls
    with counting_calls() as calls:
        with OpenAIBackend(server.base_url, "m") as first:
            first.generate([f"a{i}" for i in range(6)])
        with OpenAIBackend(server.base_url, "m") as second:
            second.generate(["b0", "b1"])
        with OpenAIBackend(server.base_url, "other") as third:
            third.generate(["c0"])

        def in_a_thread() -> None:  # a thread started inside the run, not by a task runner
            with counting_calls() as own, OpenAIBackend(server.base_url, "m") as backend:
                backend.generate(["d0"])
                assert own.totals()[0]["requests"] == 1

        worker = threading.Thread(target=in_a_thread)
        worker.start()
        worker.join()
    outside.generate(["e0"])
    outside.close()
    totals = {t["model"]: t for t in calls.totals()}
    assert set(totals) == {"m", "other"} and totals["other"]["requests"] == 1
    m = totals["m"]
    assert (m["backend"], m["requests"], m["retries"], m["failed"]) == ("openai", 8, 0, 0)
    assert (m["prompt_tokens"], m["completion_tokens"]) == (8 * 3, 8 * 2)
    assert len(server.arrivals) == 8 + 1 + 1 + 1  # the run's, the thread's, the outsider's
    table = calls_markdown(calls.totals())
    assert table.startswith("## Model calls") and "| openai | other | 1 |" in table
    assert calls_markdown([]) == ""


def test_totals_add_counts_and_keep_the_lowest_limit() -> None:
    calls = CallCounts()
    calls.add("vllm", "x", RequestCounts(requests=5, status_429=2, limit_cuts=1, lowest_limit=64))
    calls.add("vllm", "x", RequestCounts(requests=3, limit_cuts=2, lowest_limit=16))
    calls.add("vllm", "x", RequestCounts(requests=1))
    calls.add("transformers", "x", RequestCounts(requests=4, prompt_tokens=40))
    vllm, local = calls.totals()
    assert (vllm["backend"], vllm["requests"], vllm["status_429"]) == ("vllm", 9, 2)
    assert (vllm["limit_cuts"], vllm["lowest_limit"]) == (3, 16)
    assert (local["backend"], local["requests"], local["prompt_tokens"]) == ("transformers", 4, 40)
    assert local["lowest_limit"] is None
    assert "| 3 (16) |" in calls_markdown([vllm])
