"""The HTTP backend against a plain httpx.AsyncClient and the thread pool it replaced.

A stand-in OpenAI-compatible server on 127.0.0.1 (this file with `--serve`, an ASGI app
under uvicorn, started here in its own process) answers `/v1/completions` after
`--latency` seconds (1). Three clients send the same `--prompts` (512) with `--in-flight`
(256) requests at once: Flywheel's `OpenAIBackend`; a plain `httpx.AsyncClient` with a
semaphore and a pool of that size; and a `ThreadPoolExecutor` of that many threads
sharing one `httpx.Client`, as the backend did before (commit 8a80d10). Figures:
requests/s, each against the plain client's, and failures. `--overload N` makes the
server answer 429 (with `Retry-After: 1`) to any request beyond N at once; there the
plain client and the thread pool fail what was refused, and the backend must finish
every request.

    .venv/bin/python benchmarks/http_backend.py
    .venv/bin/python benchmarks/http_backend.py --overload 64
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
from common import ROOT, make_parser, table, write_results


def serve(port: int, latency: float, overload: int | None) -> None:
    """The stand-in server: a completion per request after `latency` seconds."""
    import uvicorn
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    held = 0

    async def completions(request: Request) -> JSONResponse:
        nonlocal held
        body = await request.json()
        if overload is not None and held >= overload:
            return JSONResponse({"error": "busy"}, status_code=429, headers={"Retry-After": "1"})
        held += 1
        try:
            await asyncio.sleep(latency)
        finally:
            held -= 1
        text = f"<{body['prompt']}>"
        usage = {"prompt_tokens": 4, "completion_tokens": 4}
        return JSONResponse({"choices": [{"index": 0, "text": text}], "usage": usage})

    async def health(request: Request) -> JSONResponse:
        return JSONResponse({"ok": True})

    app = Starlette(
        routes=[Route("/v1/completions", completions, methods=["POST"]), Route("/health", health)]
    )
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", backlog=4096)


@contextlib.contextmanager
def stand_in_server(latency: float, overload: int | None = None) -> Iterator[str]:
    """The stand-in server in a process of its own, until the block ends: its base URL."""
    sys.path.insert(0, str(ROOT))
    from tests.helpers.ports import free_port

    port = free_port()
    command = [sys.executable, __file__, "--serve", str(port), "--latency", str(latency)]
    if overload:
        command += ["--overload", str(overload)]
    server = subprocess.Popen(command)
    try:
        for _ in range(200):
            try:
                httpx.get(f"http://127.0.0.1:{port}/health", timeout=1)
                break
            except httpx.TransportError:
                time.sleep(0.1)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        server.terminate()
        server.wait(30)


def plain_client(url: str, prompts: list[str], in_flight: int) -> tuple[float, int]:
    async def run() -> int:
        limits = httpx.Limits(max_connections=in_flight, max_keepalive_connections=in_flight)
        gate = asyncio.Semaphore(in_flight)
        async with httpx.AsyncClient(base_url=url, limits=limits, timeout=120) as client:

            async def one(prompt: str) -> bool:
                async with gate:
                    body = {"model": "m", "prompt": prompt, "max_tokens": 4}
                    resp = await client.post("/completions", json=body)
                    return resp.status_code == 200

            done = await asyncio.gather(*(one(p) for p in prompts))
        return sum(not ok for ok in done)

    t = time.perf_counter()
    failed = asyncio.run(run())
    return time.perf_counter() - t, failed


def thread_pool(url: str, prompts: list[str], in_flight: int) -> tuple[float, int]:
    client = httpx.Client(base_url=url, timeout=120)

    def one(prompt: str) -> bool:
        body = {"model": "m", "prompt": prompt, "max_tokens": 4}
        try:
            return client.post("/completions", json=body).status_code == 200
        except httpx.TransportError:  # one shared client across many threads breaks
            return False

    t = time.perf_counter()
    with ThreadPoolExecutor(max_workers=in_flight) as pool:
        done = list(pool.map(one, prompts))
    client.close()
    return time.perf_counter() - t, sum(not ok for ok in done)


def flywheel_backend(url: str, prompts: list[str], in_flight: int) -> tuple[float, int, dict]:
    from flywheel.llm import BackendError, OpenAIBackend

    with OpenAIBackend(url, "m", max_in_flight=in_flight) as backend:
        t = time.perf_counter()
        try:
            out = backend.generate(prompts, max_new_tokens=4)
            failed = sum(o != f"<{p}>" for o, p in zip(out, prompts, strict=True))
        except BackendError:
            failed = backend.counts.failed or len(prompts)
        return time.perf_counter() - t, failed, backend.counts.as_dict()


def main() -> None:
    parser = make_parser(__doc__.splitlines()[0])
    parser.add_argument("--serve", type=int, help=argparse.SUPPRESS)  # the server process
    parser.add_argument("--latency", type=float, default=1.0)
    parser.add_argument("--prompts", type=int, help="default 512, --quick 128")
    parser.add_argument("--in-flight", type=int, default=256)
    parser.add_argument("--overload", type=int, help="429 beyond this many requests at once")
    args = parser.parse_args()
    if args.serve:
        return serve(args.serve, args.latency, args.overload)

    with stand_in_server(args.latency, args.overload) as url:
        n = args.prompts or (128 if args.quick else 512)
        prompts = [f"prompt {i}" for i in range(n)]
        plain_s, plain_failed = plain_client(url, prompts, args.in_flight)
        flywheel_s, flywheel_failed, counts = flywheel_backend(url, prompts, args.in_flight)
        pool_s, pool_failed = thread_pool(url, prompts, args.in_flight)

    rows = [
        ("plain httpx.AsyncClient", plain_s, n / plain_s, 1.0, plain_failed),
        (
            "flywheel OpenAIBackend",
            flywheel_s,
            n / flywheel_s,
            plain_s / flywheel_s,
            flywheel_failed,
        ),
        ("thread pool (before)", pool_s, n / pool_s, plain_s / pool_s, pool_failed),
    ]
    print(table(["client", "seconds", "requests/s", "vs plain", "failed"], rows))
    print("backend counts:", json.dumps(counts))
    figures = {
        "prompts": n,
        "in flight": args.in_flight,
        "server latency s": args.latency,
        "server 429 beyond": args.overload,
        "clients": {
            name: {"seconds": s, "requests/s": rps, "vs plain": ratio, "failed": failed}
            for name, s, rps, ratio, failed in rows
        },
        "backend counts": counts,
    }
    name = "http_backend_overload" if args.overload else "http_backend"
    write_results(name, args, [], figures, "cpu")


if __name__ == "__main__":
    main()
