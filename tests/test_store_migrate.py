"""`flywheel store migrate` on a store written by the code before the lake
(tests/fixtures/store_before_lake, made by tests/fixtures/store_before_lake.py)."""

import json
import shutil
from pathlib import Path

import pyarrow.parquet as pq
from typer.testing import CliRunner

from flywheel.cli import app
from flywheel.store import DatasetNotFound, list_datasets, list_versions, read_dataset, sql

OLD = Path(__file__).parent / "fixtures" / "store_before_lake"


def _migrate() -> str:
    result = CliRunner().invoke(app, ["store", "migrate"])
    assert result.exit_code == 0, result.output
    return result.output


def test_migrate_moves_every_version_with_its_lineage_once(tmp_path, monkeypatch):
    root = tmp_path / "data"
    shutil.copytree(OLD, root)
    monkeypatch.setenv("FLYWHEEL_DATA_DIR", str(root))
    try:
        read_dataset("items")
        raise AssertionError("the old layout is not read as the lake")
    except DatasetNotFound as err:
        assert "flywheel store migrate" in str(err)

    out = _migrate()
    assert "moved into the lake: 5 version(s)" in out
    assert "left in place" in out
    assert list_datasets() == ["empty", "items", "pairs", "pairs__failed"]
    assert list_versions("items") == ["v1", "v2"]
    for name, version in [("items", "v1"), ("items", "v2"), ("pairs", "v1"), ("empty", "v1")]:
        old_folder = OLD / name / version
        old_rows = pq.read_table(old_folder / "part-00000.parquet").to_pylist()
        ref = read_dataset(name, version)
        assert ref.to_arrow().to_pylist() == old_rows
        old_meta = json.loads((old_folder / "_meta.json").read_text())
        assert ref.meta == old_meta
    assert sql("SELECT id FROM items").id.tolist() == [3]  # the latest, v2
    assert sql("SELECT count(*) AS n FROM items__v1").n[0] == 2
    assert sql("SELECT tags FROM pairs").tags[0].tolist() == ["t1", "t2"]
    lineage = sql(
        "SELECT input_dataset, input_version FROM lineage WHERE dataset = 'pairs' "
        "ORDER BY input_version"
    )
    assert lineage.values.tolist() == [["items", "v1"], ["items", "v2"]]
    model = sql("SELECT name, version, kind FROM models")
    assert model.values.tolist() == [["pairs-rm", "v1", "bradley-terry"]]
    runs = sql("SELECT run_id, status FROM runs ORDER BY run_id")
    assert runs.values.tolist() == [["run-1", "completed"], ["run-2", "completed"]]
    before = sql("SELECT count(*) AS n FROM lineage").n[0]

    again = _migrate()  # idempotent: nothing moved twice, no row added
    assert "moved into the lake: 0 version(s)" in again
    assert "already in the lake: 5 version(s)" in again
    assert sql("SELECT count(*) AS n FROM lineage").n[0] == before
    assert sql("SELECT count(*) AS n FROM versions").n[0] == 5
    assert sql("SELECT count(*) AS n FROM runs").n[0] == 2
    assert sql("SELECT count(*) AS n FROM models").n[0] == 1


def test_migrate_finishes_a_migration_stopped_halfway(tmp_path, monkeypatch):
    root = tmp_path / "data"
    shutil.copytree(OLD, root)
    monkeypatch.setenv("FLYWHEEL_DATA_DIR", str(root))
    moved_away = tmp_path / "later"
    shutil.move(root / "pairs", moved_away)  # as if the run stopped before pairs
    assert "moved into the lake: 4 version(s)" in _migrate()
    shutil.move(moved_away, root / "pairs")
    out = _migrate()
    assert "moved into the lake: 1 version(s)" in out
    assert "already in the lake: 4 version(s)" in out
    assert read_dataset("pairs", "v1").num_rows == 1
    assert sql("SELECT count(*) AS n FROM versions").n[0] == 5


def test_migrate_refuses_an_unreadable_version_and_moves_the_rest(tmp_path, monkeypatch):
    root = tmp_path / "data"
    shutil.copytree(OLD, root)
    monkeypatch.setenv("FLYWHEEL_DATA_DIR", str(root))
    (root / "items" / "v2" / "part-00000.parquet").write_bytes(b"not parquet")
    result = CliRunner().invoke(app, ["store", "migrate"])
    assert result.exit_code == 1
    assert "not moved: items@v2: cannot read" in result.output
    assert list_versions("items") == ["v1"]
    assert list_versions("pairs") == ["v1"]
