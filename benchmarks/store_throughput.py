"""Store throughput: this checkout's store against an earlier commit's, same machine, same run.

Each store runs the same script in its own process, on its own empty data folder:
`write_dataset` of one 100k-row dataset (rows/s, catalog registration included), reading
it back whole (`read_dataset(...).to_arrow()`) and through the catalog (`sql`, a
`count(*)` and a `sum` over the latest view), then `--versions` (1,000; `--quick` 200)
small versions of one dataset written one after another (versions/s) and the catalog
listing them (`SHOW TABLES` through `sql`, and `list_versions`). The earlier commit
(`--baseline`, default `4e72652`: the last one whose catalog is the `flywheel.duckdb`
file) is checked out with `git worktree` into a temporary folder and imported from there.

    .venv/bin/python benchmarks/store_throughput.py --quick
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from common import ROOT, make_parser, table, write_results

MEASURE = r"""
import json, sys, time
from pathlib import Path
import flywheel
from flywheel.store import list_versions, read_dataset, sql, write_dataset

root, rows, versions = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
table = [{"id": i, "text": f"row {i}", "score": i * 0.5} for i in range(rows)]
out = {"flywheel": str(Path(flywheel.__file__).parent)}

t = time.perf_counter()
write_dataset("big", table, root=root)
out["write rows/s"] = rows / (time.perf_counter() - t)
t = time.perf_counter()
n = read_dataset("big", root=root).to_arrow().num_rows
out["read rows/s (to_arrow)"] = n / (time.perf_counter() - t)
t = time.perf_counter()
got = sql("SELECT count(*) AS n, sum(score) AS s FROM big", root=root)
out["read rows/s (sql count+sum)"] = int(got.n[0]) / (time.perf_counter() - t)

t = time.perf_counter()
for v in range(versions):
    write_dataset("small", [{"v": v}], version=f"v{v:05d}", root=root)
out["small versions written/s"] = versions / (time.perf_counter() - t)
t = time.perf_counter()
shown = set(sql("SHOW TABLES", root=root).name)
out["catalog listing seconds (SHOW TABLES)"] = time.perf_counter() - t
t = time.perf_counter()
listed = list_versions("small", root=root)
out["list_versions seconds"] = time.perf_counter() - t
assert len(listed) == versions and sum(x.startswith("small__") for x in shown) == versions
print(json.dumps(out))
"""


def measure(source: Path, rows: int, versions: int) -> dict:
    """Run MEASURE with the flywheel package of `source`, on a fresh data folder."""
    with tempfile.TemporaryDirectory(prefix="flywheel-store-bench-") as data:
        env = {**os.environ, "PYTHONPATH": str(source), "FLYWHEEL_DATA_DIR": data}
        done = subprocess.run(
            [sys.executable, "-c", MEASURE, data, str(rows), str(versions)],
            env=env,
            cwd=data,
            capture_output=True,
            text=True,
            check=False,
        )
    if done.returncode != 0:
        raise SystemExit(f"measuring {source} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = make_parser(__doc__.splitlines()[0])
    parser.add_argument("--baseline", default="4e72652", help="the earlier commit to compare")
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--versions", type=int, help="default 1000, --quick 200")
    args = parser.parse_args()
    versions = args.versions or (200 if args.quick else 1000)

    with tempfile.TemporaryDirectory(prefix="flywheel-baseline-") as tmp:
        worktree = Path(tmp) / "baseline"
        subprocess.run(
            ["git", "worktree", "add", "--detach", str(worktree), args.baseline],
            cwd=ROOT,
            check=True,
            capture_output=True,
        )
        try:
            before = measure(worktree, args.rows, versions)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(worktree)], cwd=ROOT)
    now = measure(ROOT, args.rows, versions)
    for result, source in ((before, worktree), (now, ROOT)):
        imported = Path(result.pop("flywheel")).resolve()
        if imported != (source / "flywheel").resolve():
            raise SystemExit(f"imported flywheel from {imported}, not from {source}")

    rows = [
        (name, before[name], now[name], now[name] / before[name] if before[name] else None)
        for name in now
    ]
    print(table(["figure", f"baseline {args.baseline}", "this checkout", "this / baseline"], rows))
    figures = {"baseline": args.baseline, "rows": args.rows, "versions": versions}
    figures |= {name: {"baseline": b, "now": n, "ratio": r} for name, b, n, r in rows}
    write_results("store_throughput", args, [], figures, "cpu")


if __name__ == "__main__":
    main()
