"""Many writers and a reader on one store at once: nothing lost, duplicated or failed.

8 writer processes (`--writers`) each publish datasets with `write_dataset` for
`--seconds` (60; `--quick` 20): in turn a dataset of its own and a new version of one
dataset all of them share, 100 rows each, and record a run per dataset in `runs`. The
main process reads all the while through `flywheel sql` (`sql()`, a read-only attach of
the lake): the shared dataset's latest view, the `runs` count. At the end every version a
writer says it wrote must be in the catalog as a view with its rows, once; every run once.
With `--shared-lake` the lake is the one several machines share: a PostgreSQL catalog and
its data files in S3, on servers started here (moto's S3-compatible server), as in
tests/test_lake_servers.py.

    .venv/bin/python benchmarks/store_concurrency.py --quick
    .venv/bin/python benchmarks/store_concurrency.py --shared-lake
"""

from __future__ import annotations

import multiprocessing
import os
import statistics
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from common import ROOT, bench_env, make_parser, table, write_results

ROWS_PER_VERSION = 100


def writer(root: str, who: int, seconds: float, start, results) -> None:
    """Write until the time is up; report what was written and every error's text."""
    from flywheel.store import record_run, write_dataset

    start.wait()
    written, errors = [], []
    deadline = time.monotonic() + seconds
    i = 0
    while time.monotonic() < deadline:
        name = f"own_{who}" if i % 2 == 0 else "shared"
        version = f"v{who:02d}_{i:06d}"
        rows = [{"writer": who, "i": i, "row": r} for r in range(ROWS_PER_VERSION)]
        try:
            write_dataset(name, rows, version=version, produced_by=f"w{who}", root=Path(root))
            record_run(f"w{who}-{i}", "bench/writer", {"i": i}, "completed", root=Path(root))
            written.append((name, version))
        except Exception as err:  # counted and shown, never hidden
            errors.append(f"{type(err).__name__}: {err}"[:300])
        i += 1
    results.put((who, written, errors))


@contextmanager
def lake_settings(shared: bool) -> Iterator[str]:
    """The lake's settings for the writers and the reader (spawned processes inherit
    them); what the lake is, in words."""
    if not shared:
        yield "SQLite catalog, data files in the data folder"
        return
    sys.path.insert(0, str(ROOT))  # the servers the tests start
    from flywheel.store import lake
    from tests.helpers import lake_servers

    if why := lake_servers.missing_part():
        raise SystemExit(f"--shared-lake: {why}")
    with lake_servers.postgres_server() as postgres, lake_servers.s3_server() as s3_url:
        settings = lake_servers.shared_lake_env(postgres, s3_url, "bench")
        saved = {k: os.environ.get(k) for k in settings}
        os.environ.update(settings)
        try:
            yield "PostgreSQL catalog, data files in S3 (moto server)"
        finally:
            lake.close_all()
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value


def main() -> None:
    parser = make_parser(__doc__.splitlines()[0])
    parser.add_argument("--writers", type=int, default=8)
    parser.add_argument("--seconds", type=float, help="default 60, --quick 20")
    parser.add_argument(
        "--shared-lake", action="store_true", help="a PostgreSQL catalog and S3 data files"
    )
    args = parser.parse_args()
    seconds = args.seconds or (20.0 if args.quick else 60.0)

    from flywheel.store import refresh_catalog, sql

    with bench_env(args) as data, lake_settings(args.shared_lake) as lake_kind:
        refresh_catalog(data)  # the store exists before the writers start
        ctx = multiprocessing.get_context("spawn")
        start, results = ctx.Event(), ctx.Queue()
        procs = [
            ctx.Process(target=writer, args=(str(data), w, seconds, start, results))
            for w in range(args.writers)
        ]
        for p in procs:
            p.start()
        time.sleep(5)  # the writers' imports
        start.set()
        read_seconds, read_errors, began = [], [], time.monotonic()
        while time.monotonic() - began < seconds:
            t = time.monotonic()
            try:
                sql("SELECT count(*) AS n FROM runs", root=data)
                if "shared" in set(sql("SHOW TABLES", root=data).name):
                    sql("SELECT count(*) AS n FROM shared", root=data)
                read_seconds.append(time.monotonic() - t)
            except Exception as err:
                read_errors.append(f"{type(err).__name__}: {err}"[:300])
        reported = [results.get(timeout=600) for _ in procs]
        for p in procs:
            p.join(600)

        written = [v for _, versions, _ in reported for v in versions]
        write_errors = [e for _, _, errors in reported for e in errors]
        views = set(sql("SHOW TABLES", root=data).name)
        missing = [f"{n}__{v}" for n, v in written if f"{n}__{v}" not in views]
        rows_in_catalog = 0
        for name, version in written:
            if f"{name}__{version}" in views:
                q = f'SELECT count(*) AS n FROM "{name}__{version}"'
                rows_in_catalog += int(sql(q, root=data).n[0])
        runs = sql("SELECT count(*) AS n, count(DISTINCT run_id) AS d FROM runs", root=data).iloc[0]
        lineage = sql(
            "SELECT count(*) AS n, count(DISTINCT (dataset, version)) AS d FROM lineage",
            root=data,
        ).iloc[0]
        shared_latest = sql("SELECT count(*) AS n FROM shared", root=data).n[0]

    figures = {
        "lake": lake_kind,
        "writers": args.writers,
        "seconds": seconds,
        "versions written": len(written),
        "rows written": len(written) * ROWS_PER_VERSION,
        "rows in the catalog's views": rows_in_catalog,
        "versions missing from the catalog": len(missing),
        "runs recorded": int(runs.n),
        "runs recorded twice": int(runs.n - runs.d),
        "lineage rows": int(lineage.n),
        "lineage rows duplicated": int(lineage.n - lineage.d),
        "write failures": len(write_errors),
        "reads": len(read_seconds),
        "read seconds, median": statistics.median(read_seconds) if read_seconds else None,
        "read seconds, longest": max(read_seconds, default=None),
        "read failures": len(read_errors),
        "shared dataset's latest view rows": int(shared_latest),
        "first errors": (write_errors + read_errors)[:5],
    }
    print(table(["figure", "value"], [(k, v) for k, v in figures.items() if k != "first errors"]))
    for error in figures["first errors"]:
        print("error:", error)
    name = "store_concurrency_shared_lake" if args.shared_lake else "store_concurrency"
    write_results(name, args, [], figures, "cpu")


if __name__ == "__main__":
    main()
