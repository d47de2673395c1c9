"""Two spawned processes writing to one store at once, through the store's public API,
and the checks that every version they wrote landed once: shared by the tests of the
default lake and of the PostgreSQL + S3 one (the processes inherit the environment that
points at it)."""

from __future__ import annotations

import multiprocessing
from pathlib import Path

from flywheel.store import list_datasets, list_versions, read_dataset, sql, write_dataset

WHO = ("left", "right")
COUNT = 10


def in_two_processes(target, root: Path) -> None:
    """`target(root, who, COUNT, start)` for each writer, in two spawned processes started
    together; both must exit 0."""
    ctx = multiprocessing.get_context("spawn")
    start = ctx.Barrier(len(WHO))
    procs = [ctx.Process(target=target, args=(str(root), who, COUNT, start)) for who in WHO]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0] * len(WHO)


def write_many(root: str, prefix: str, count: int, start) -> None:
    start.wait()
    for i in range(count):
        write_dataset(
            f"{prefix}_{i}", [{"i": i, "who": prefix}], produced_by=prefix, root=Path(root)
        )


def check_many(root: Path) -> None:
    """What two `write_many` wrote: one dataset each, its row, lineage and view."""
    names = [f"{prefix}_{i}" for prefix in WHO for i in range(COUNT)]
    assert list_datasets(root) == sorted(names)
    views = sql("SELECT view_name FROM duckdb_views() WHERE NOT internal", root=root)
    assert set(names) <= set(views.view_name)
    lineage = sql("SELECT dataset, produced_by FROM lineage", root=root)
    assert sorted(lineage.dataset) == sorted(names)
    for name in names:
        assert sql(f"SELECT who FROM {name}", root=root).who.tolist() == [name.split("_")[0]]


def write_versions(root: str, who: str, count: int, start) -> None:
    start.wait()
    for i in range(count):
        rows = [{"who": who, "i": i, "row": r} for r in range(50)]
        write_dataset("shared", rows, version=f"v{i:03d}_{who}", produced_by=who, root=Path(root))


def check_versions(root: Path) -> None:
    """What two `write_versions` wrote: every version of `shared` once, with its rows."""
    versions = list_versions("shared", root=root)
    assert versions == sorted(f"v{i:03d}_{who}" for who in WHO for i in range(COUNT))
    for version in versions:
        rows = read_dataset("shared", version, root=root).to_arrow().to_pylist()
        who, i = version.split("_")[1], int(version[1:4])
        assert rows == [{"who": who, "i": i, "row": r} for r in range(50)]
    latest = sql("SELECT DISTINCT who, i FROM shared", root=root)
    assert latest.values.tolist() == [["right", COUNT - 1]]  # the view: the greatest version
    counts = sql("SELECT count(*) AS n FROM lineage WHERE dataset = 'shared'", root=root)
    assert counts.n[0] == len(WHO) * COUNT


def write_one_version(root: str, who: str, version: str, start) -> None:
    """Both writers publish `clash@<version>` at the same moment, COUNT rows each; the one
    that finds it there already exits 3 (DatasetVersionExists), any other failure fails."""
    from flywheel.store import DatasetVersionExists

    rows = [{"who": who, "row": r} for r in range(COUNT)]
    start.wait()
    try:
        write_dataset("clash", rows, version=version, produced_by=who, root=Path(root))
    except DatasetVersionExists:
        raise SystemExit(3) from None


def one_version_exit_codes(root: Path, version: str) -> list[int]:
    """The exit codes of two `write_one_version` processes, sorted."""
    ctx = multiprocessing.get_context("spawn")
    start = ctx.Barrier(len(WHO))
    procs = [
        ctx.Process(target=write_one_version, args=(str(root), who, version, start)) for who in WHO
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    return sorted(p.exitcode for p in procs)
