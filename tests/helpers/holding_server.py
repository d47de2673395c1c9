"""A local OpenAI-compatible server that holds each request a while and counts how many
it holds at once (and can refuse beyond a capacity with 429)."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Holding:
    """Answers `/v1/completions` after `hold` seconds with the prompt echoed and a usage
    block; with `capacity`, a request beyond that many at once gets 429 at once (with
    `Retry-After: retry_after` when given). Records peak concurrency and arrival times."""

    def __init__(
        self, hold: float, capacity: int | None = None, retry_after: float | None = None
    ) -> None:
        self.hold, self.capacity, self.retry_after = hold, capacity, retry_after
        self.now = self.peak = 0
        self.arrivals: list[float] = []
        self.rejections: list[float] = []
        lock, outer = threading.Lock(), self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as a model server does

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with lock:
                    outer.arrivals.append(time.monotonic())
                    full = outer.capacity is not None and outer.now >= outer.capacity
                    if not full:
                        outer.now += 1
                        outer.peak = max(outer.peak, outer.now)
                if full:
                    headers = {"Retry-After": str(outer.retry_after)} if outer.retry_after else {}
                    outer.rejections.append(time.monotonic())
                    return self._reply(429, '{"error": "too many requests"}', headers)
                time.sleep(outer.hold)
                with lock:
                    outer.now -= 1
                text = json.dumps(
                    {
                        "choices": [{"index": 0, "text": f"<{body['prompt']}>"}],
                        "usage": {"prompt_tokens": 3, "completion_tokens": 2},
                    }
                )
                self._reply(200, text, {})

            def _reply(self, status: int, text: str, headers: dict[str, str]) -> None:
                data = text.encode()
                self.send_response(status)
                for key, value in headers.items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *a: object) -> None:
                pass

        ThreadingHTTPServer.request_queue_size = 512
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
