"""A stand-in model server for ManagedServer tests.

usage: fake_server.py PORT [--delay S] [--exit-code N] [--never-healthy]
                           [--child-pid-file PATH] [--ignore-term]
"""

import argparse
import http.server
import signal
import subprocess
import sys
import time

parser = argparse.ArgumentParser()
parser.add_argument("port", type=int)
parser.add_argument("--delay", type=float, default=0.0)
parser.add_argument("--exit-code", type=int)
parser.add_argument("--never-healthy", action="store_true")
parser.add_argument("--child-pid-file")
parser.add_argument("--ignore-term", action="store_true")
args = parser.parse_args()

print("fake server starting", flush=True)
if args.exit_code is not None:
    print("fatal: cannot load model (fake)", file=sys.stderr, flush=True)
    sys.exit(args.exit_code)
if args.ignore_term:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
if args.child_pid_file:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
    with open(args.child_pid_file, "w") as f:
        f.write(str(child.pid))
time.sleep(args.delay)


class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        code = 503 if args.never_healthy or self.path != "/health" else 200
        self.send_response(code)
        self.end_headers()

    def log_message(self, *a: object) -> None:
        pass


http.server.HTTPServer(("127.0.0.1", args.port), Handler).serve_forever()
