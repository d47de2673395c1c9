"""The DuckLake catalog (flywheel.store.lake): extensions from the installed wheels, no
download; snapshots and time travel; writers in several processes with every row landing
once; the DuckDB CLI reading the lake while a process writes to it."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import datasets
import duckdb
import pytest

from flywheel.store import StoreError, lake

CLI = Path(sys.executable).with_name("duckdb")


def test_time_travel_and_snapshots(tmp_path: Path) -> None:
    root = tmp_path / "it's data"  # a quote in the path stays a path
    with lake.connect(root) as con:
        lake.write(con, lambda c: c.execute("CREATE TABLE lake.t (id INTEGER, text VARCHAR)"))
        for start in (0, 3):
            lake.write(
                con,
                lambda c, s=start: c.execute(
                    "INSERT INTO lake.t SELECT i, 'row ' || i FROM range(?, ?) r(i)", [s, s + 3]
                ),
            )
        taken = [s["id"] for s in lake.snapshots(con)]
        first_insert = taken[-2]
        before = con.execute(f"SELECT count(*) FROM lake.t AT (VERSION => {first_insert})")
        assert before.fetchone() == (3,)
        assert con.execute("SELECT count(*) FROM lake.t").fetchone() == (6,)
        # every insert is a parquet file, also of 3 rows (DuckLake's default inlines up to
        # 10 into the catalog): the files of a snapshot hold all of its rows
        files = lake.files_at(con, "t", first_insert)
    rows = datasets.load_dataset("parquet", data_files=files, split="train")
    assert sorted(rows["id"]) == [0, 1, 2]
    # made in WAL mode, where a reader never waits for a writer's commit
    with sqlite3.connect(lake.catalog_file(root)) as db:
        assert db.execute("PRAGMA journal_mode").fetchone() == ("wal",)


def test_a_failed_write_leaves_nothing(tmp_path: Path) -> None:
    with lake.connect(tmp_path) as con:
        lake.write(con, lambda c: c.execute("CREATE TABLE lake.t (id INTEGER)"))

        def half(c: duckdb.DuckDBPyConnection) -> None:
            c.execute("INSERT INTO lake.t VALUES (1), (2)")
            raise ValueError("the producer failed")

        with pytest.raises(ValueError, match="producer"):
            lake.write(con, half)
        assert con.execute("SELECT count(*) FROM lake.t").fetchone() == (0,)


def test_a_read_only_connection_cannot_write(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="no lake"):
        with lake.connect(tmp_path, read_only=True):
            pass
    with lake.connect(tmp_path) as con:
        lake.write(con, lambda c: c.execute("CREATE TABLE lake.t (id INTEGER)"))
    with lake.connect(tmp_path, read_only=True) as con:
        with pytest.raises(duckdb.Error, match="read-only"):
            con.execute("INSERT INTO lake.t VALUES (1)")


def test_a_missing_extension_build_names_the_wheel_and_version(monkeypatch) -> None:
    monkeypatch.setattr(duckdb, "__version__", "1.9.0")
    with pytest.raises(lake.LakeUnavailable, match=r"duckdb-extension-ducklake==1\.9\.0"):
        lake.extension_path("ducklake")


WRITER = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from flywheel.store import lake

    root, writer = Path(sys.argv[1]), int(sys.argv[2])
    with lake.connect(root) as con:
        for batch in range(5):
            lake.write(con, lambda c: c.execute(
                "INSERT INTO lake.rows SELECT ?, ?, i FROM range(1000) r(i)", [writer, batch]
            ))
    """
)


@pytest.mark.slow
def test_writers_in_several_processes_land_every_row_once(tmp_path: Path) -> None:
    with lake.connect(tmp_path) as con:
        lake.write(
            con,
            lambda c: c.execute("CREATE TABLE lake.rows (writer INT, batch INT, i INT)"),
        )
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    writers = [
        subprocess.Popen([sys.executable, str(script), str(tmp_path), str(w)]) for w in range(3)
    ]
    # the DuckDB CLI reads the lake the documented way while they write
    cli = [*lake.load_statements(), lake.attach_statement(tmp_path, read_only=True)]
    reads = []
    while any(w.poll() is None for w in writers):
        query = ";\n".join([*cli, "SELECT count(*) FROM lake.rows;"])
        out = subprocess.run(
            [str(CLI), "-csv", "-noheader", "-c", query], capture_output=True, text=True
        )
        assert out.returncode == 0, out.stderr
        reads.append(int(out.stdout.split()[-1]))
    assert [w.wait() for w in writers] == [0, 0, 0]
    assert reads == sorted(reads)  # each read sees a snapshot at least as new as the last
    with lake.connect(tmp_path, read_only=True) as con:
        total, distinct = con.execute(
            "SELECT count(*), count(DISTINCT (writer, batch, i)) FROM lake.rows"
        ).fetchone()
    assert total == distinct == 3 * 5 * 1000


CREATOR = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from flywheel.store import lake

    with lake.connect(Path(sys.argv[1])):
        pass
    """
)


@pytest.mark.slow
def test_a_reader_never_finds_a_half_made_lake(tmp_path: Path) -> None:
    """Processes creating lakes while this one reads them: a read finds no lake or the
    whole lake, never a catalog file without the lake's tables in it yet."""
    script = tmp_path / "creator.py"
    script.write_text(CREATOR)
    for attempt in range(4):
        root = tmp_path / f"lake{attempt}"
        creators = [subprocess.Popen([sys.executable, str(script), str(root)]) for _ in range(2)]
        found = False
        while not found:
            try:
                with lake.connect(root, read_only=True) as con:
                    found = con.execute("SELECT 1").fetchone() == (1,)
            except StoreError as err:
                assert "no lake" in str(err)
            if not found and all(c.poll() is not None for c in creators):
                break
        assert [c.wait() for c in creators] == [0, 0]
        made = [p.name for p in (root / "lake").iterdir()]
        assert "catalog.sqlite" in made
        assert not [name for name in made if ".new" in name]  # the loser's copy is removed
        with lake.connect(root, read_only=True) as con:  # once made, a reader finds it
            assert con.execute("SELECT 1").fetchone() == (1,)
