import json
import multiprocessing
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pytest

import flywheel.store.catalog as catalog
import flywheel.store.datasets as datasets
from flywheel.store import (
    CatalogBusy,
    DatasetNotFound,
    DatasetVersionExists,
    InvalidDatasetName,
    StoreError,
    data_root,
    failed_name,
    list_datasets,
    list_versions,
    read_dataset,
    record_run,
    refresh_catalog,
    sql,
    validate_name,
    write_dataset,
)

ROWS = [{"id": 1, "text": "a"}, {"id": 2, "text": "b"}, {"id": 3, "text": None}]


def views(root: Path) -> set[str]:
    return set(sql("SELECT view_name FROM duckdb_views() WHERE NOT internal", root=root).view_name)


def test_round_trip(tmp_path):
    ref = write_dataset("items", ROWS, produced_by="run-1", root=tmp_path)
    assert ref.to_arrow().to_pylist() == ROWS
    assert ref.to_pandas()["id"].tolist() == [1, 2, 3]
    assert ref.num_rows == 3
    assert ref.meta["produced_by"] == "run-1"
    assert ref.meta["columns"] == {"id": "int64", "text": "string"}
    assert ref.files() == [str(tmp_path / "items" / ref.version / "part-00000.parquet")]
    assert read_dataset("items", root=tmp_path) == ref
    assert list_datasets(tmp_path) == ["items"]
    # pandas and arrow inputs too
    again = write_dataset("items_df", ref.to_pandas(), root=tmp_path)
    assert again.to_arrow().to_pylist() == ROWS
    assert write_dataset("items_pa", ref.to_arrow(), root=tmp_path).num_rows == 3


def test_data_root_env(tmp_path, monkeypatch):
    monkeypatch.setenv("FLYWHEEL_DATA_DIR", str(tmp_path / "elsewhere"))
    assert data_root() == tmp_path / "elsewhere"
    write_dataset("x", ROWS)
    assert (tmp_path / "elsewhere" / "x").is_dir()
    monkeypatch.delenv("FLYWHEEL_DATA_DIR")
    monkeypatch.chdir(tmp_path)
    assert data_root() == tmp_path / "data"


def test_empty_rows_need_schema(tmp_path):
    with pytest.raises(ValueError, match="schema="):
        write_dataset("empty", [], root=tmp_path)
    schema = pa.schema([("id", pa.int64()), ("text", pa.string())])
    ref = write_dataset("empty", [], schema=schema, root=tmp_path)
    assert ref.num_rows == 0
    assert sql("SELECT count(*) AS n FROM empty", root=tmp_path).n[0] == 0


def test_split_into_parts(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets, "ROWS_PER_PART", 2)
    ref = write_dataset("parts", [{"i": i} for i in range(5)], root=tmp_path)
    assert [Path(f).name for f in ref.files()] == [
        "part-00000.parquet",
        "part-00001.parquet",
        "part-00002.parquet",
    ]
    assert [r["i"] for r in ref.to_arrow().to_pylist()] == list(range(5))
    assert sql("SELECT count(*) AS n FROM parts", root=tmp_path).n[0] == 5


def test_crash_midway_leaves_no_version(tmp_path, monkeypatch):
    write_dataset("other", ROWS, root=tmp_path)  # so the catalog exists
    monkeypatch.setattr(datasets, "ROWS_PER_PART", 1)
    real_write = datasets.pq.write_table
    calls = []

    def failing_write(table, where, **kwargs):
        calls.append(where)
        if len(calls) == 2:
            raise OSError("disk full")
        real_write(table, where, **kwargs)

    monkeypatch.setattr(datasets.pq, "write_table", failing_write)
    with pytest.raises(OSError, match="disk full"):
        write_dataset("crashed", ROWS, version="v1", root=tmp_path)
    assert len(calls) == 2
    assert not (tmp_path / "crashed" / "v1").exists()
    assert list_versions("crashed", root=tmp_path) == []
    assert "crashed" not in list_datasets(tmp_path)
    assert not {"crashed", "crashed__v1"} & views(tmp_path)
    with pytest.raises(DatasetNotFound):
        read_dataset("crashed", root=tmp_path)


def test_leftover_tmp_folder_ignored(tmp_path):
    ref = write_dataset("items", ROWS, root=tmp_path)
    (tmp_path / "items" / ".tmp-deadbeef").mkdir()
    (tmp_path / "items" / ".tmp-deadbeef" / "part-00000.parquet").write_bytes(b"junk")
    assert list_versions("items", root=tmp_path) == [ref.version]
    refresh_catalog(tmp_path)
    assert sql("SELECT count(*) AS n FROM items", root=tmp_path).n[0] == 3


def test_versions_are_immutable(tmp_path):
    ref = write_dataset("items", ROWS, version="v1", root=tmp_path)
    with pytest.raises(DatasetVersionExists, match="v1"):
        write_dataset("items", [{"id": 9, "text": "z"}], version="v1", root=tmp_path)
    assert issubclass(DatasetVersionExists, StoreError)
    assert ref.to_arrow().to_pylist() == ROWS
    with pytest.raises(ValueError, match="version"):
        write_dataset("items", ROWS, version="V-2", root=tmp_path)


def test_default_versions_sort_by_time(tmp_path):
    first = write_dataset("items", ROWS, root=tmp_path)
    second = write_dataset("items", ROWS, root=tmp_path)
    assert first.version < second.version
    assert datasets.VERSION_RE.match(first.version)
    assert list_versions("items", root=tmp_path) == [first.version, second.version]


@pytest.mark.parametrize("bad", ["../x", "A", "a/b", "", "1abc", "has space", "runs"])
def test_invalid_names(tmp_path, bad):
    with pytest.raises(InvalidDatasetName, match=r"\^\[a-z\]\[a-z0-9_\]") as info:
        validate_name(bad)
    assert repr(bad) in str(info.value)
    assert "try '" in str(info.value)
    suggestion = str(info.value).rsplit("try ", 1)[1].strip("'")
    assert validate_name(suggestion) == suggestion
    with pytest.raises(InvalidDatasetName):
        write_dataset(bad, ROWS, root=tmp_path)
    assert not any(tmp_path.iterdir())


def test_failed_name():
    assert failed_name("answers") == "answers__failed"
    assert validate_name(failed_name("answers"))
    with pytest.raises(InvalidDatasetName):
        failed_name("Bad")


def test_missing_dataset_lists_what_exists(tmp_path):
    write_dataset("items", ROWS, version="v1", root=tmp_path)
    with pytest.raises(DatasetNotFound, match="items"):
        read_dataset("nothing", root=tmp_path)
    with pytest.raises(DatasetNotFound, match="v1"):
        read_dataset("items", "v2", root=tmp_path)


def test_latest_view_switches(tmp_path):
    write_dataset("items", ROWS, version="v1", root=tmp_path)
    assert sql("SELECT count(*) AS n FROM items", root=tmp_path).n[0] == 3
    write_dataset("items", [{"id": 7, "text": "new"}], version="v2", root=tmp_path)
    assert sql("SELECT id FROM items", root=tmp_path).id.tolist() == [7]
    assert read_dataset("items", root=tmp_path).version == "v2"


def test_per_version_view(tmp_path):
    write_dataset("items", ROWS, version="v1", root=tmp_path)
    write_dataset("items", [{"id": 7, "text": "new"}], version="v2", root=tmp_path)
    assert sql("SELECT count(*) AS n FROM items__v1", root=tmp_path).n[0] == 3
    assert sql("SELECT count(*) AS n FROM items__v2", root=tmp_path).n[0] == 1


def test_lineage_records_inputs(tmp_path):
    a = write_dataset("a", ROWS, produced_by="run-a", root=tmp_path)
    b = write_dataset("b", ROWS, produced_by="run-b", root=tmp_path)
    c = write_dataset("c", ROWS, produced_by="run-c", inputs=[a, b], root=tmp_path)
    rows = sql("SELECT * FROM lineage ORDER BY dataset, input_dataset", root=tmp_path)
    assert rows.dataset.tolist() == ["a", "b", "c", "c"]
    assert rows[rows.dataset == "a"].input_dataset.isna().all()
    mine = rows[rows.dataset == "c"]
    assert mine.version.tolist() == [c.version, c.version]
    assert mine.produced_by.tolist() == ["run-c", "run-c"]
    assert mine.input_dataset.tolist() == ["a", "b"]
    assert mine.input_version.tolist() == [a.version, b.version]
    assert c.meta["inputs"] == [
        {"kind": "dataset", "name": "a", "version": a.version},
        {"kind": "dataset", "name": "b", "version": b.version},
    ]


def test_to_hf(tmp_path):
    ref = write_dataset("items", ROWS, root=tmp_path)
    ds = ref.to_hf(cache_dir=str(tmp_path / "hf_cache"))
    assert ds.num_rows == 3
    assert ds["text"] == ["a", "b", None]


def test_refresh_is_idempotent_and_heals(tmp_path, monkeypatch):
    a = write_dataset("a", ROWS, root=tmp_path)
    # A crash between the rename and the registration: the version is on disk only.
    monkeypatch.setattr(catalog, "register_version", lambda ref, root=None: None)
    b = write_dataset("b", ROWS, inputs=[a], root=tmp_path)
    monkeypatch.undo()
    assert "b" not in views(tmp_path)
    assert b.version not in set(sql("SELECT version FROM lineage", root=tmp_path).version)

    refresh_catalog(tmp_path)
    refresh_catalog(tmp_path)
    assert {"a", f"a__{a.version}", "b", f"b__{b.version}"} <= views(tmp_path)
    assert sql("SELECT count(*) AS n FROM b", root=tmp_path).n[0] == 3
    lineage = sql("SELECT dataset, version, input_dataset FROM lineage", root=tmp_path)
    assert len(lineage) == 2
    assert lineage[lineage.dataset == "b"].input_dataset.tolist() == ["a"]


def test_refresh_drops_views_of_removed_datasets(tmp_path):
    ref = write_dataset("gone", ROWS, root=tmp_path)
    sql("CREATE VIEW mine AS SELECT 1 AS one", root=tmp_path)
    shutil.rmtree(tmp_path / "gone")
    refresh_catalog(tmp_path)
    assert not {"gone", f"gone__{ref.version}"} & views(tmp_path)
    assert "mine" in views(tmp_path)  # views the user made are left alone


def test_sql_creates_catalog(tmp_path):
    write_dataset("items", ROWS, root=tmp_path)
    (tmp_path / "flywheel.duckdb").unlink()
    df = sql("SELECT id FROM items WHERE text = 'b'", root=tmp_path)
    assert df.id.tolist() == [2]
    assert sql("SELECT count(*) AS n FROM runs", root=tmp_path).n[0] == 0


def test_record_run_upsert(tmp_path):
    record_run("r1", "synth", {"n": 3}, "running", root=tmp_path)
    first = sql("SELECT * FROM runs", root=tmp_path)
    record_run("r1", "synth", {"n": 3}, "completed", ended=first.started[0], root=tmp_path)
    runs = sql("SELECT * FROM runs", root=tmp_path)
    assert len(runs) == 1
    assert runs.status[0] == "completed"
    assert runs.started[0] == first.started[0]
    assert runs.ended[0] == first.started[0]
    assert json.loads(runs.parameters[0]) == {"n": 3}


def test_duckdb_cli_reads_catalog(tmp_path):
    cli = Path(sys.executable).parent / "duckdb"
    if not cli.exists():
        pytest.skip("duckdb CLI (package duckdb-cli) not installed")
    write_dataset("items", ROWS, version="v1", root=tmp_path)
    out = subprocess.run(
        [str(cli), "-csv", "-noheader", str(tmp_path / "flywheel.duckdb")],
        input="select count(*) from items;\nselect count(*) from items__v1;\n",
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert out.stdout.split() == ["3", "3"]


def _hold_catalog(root: str, held, seconds: float) -> None:
    import duckdb

    con = duckdb.connect(str(Path(root) / "flywheel.duckdb"))
    held.set()
    time.sleep(seconds)
    con.close()


def test_busy_catalog_waits_then_raises(tmp_path, monkeypatch):
    write_dataset("items", ROWS, root=tmp_path)
    ctx = multiprocessing.get_context("spawn")
    held = ctx.Event()
    proc = ctx.Process(target=_hold_catalog, args=(str(tmp_path), held, 3.0))
    proc.start()
    try:
        assert held.wait(60)
        monkeypatch.setattr(catalog, "LOCK_TIMEOUT_S", 0.5)
        with pytest.raises(CatalogBusy, match="flywheel.duckdb"):
            sql("SELECT 1", root=tmp_path)
        monkeypatch.setattr(catalog, "LOCK_TIMEOUT_S", 60.0)
        # Waits for the other process to let go, then works.
        assert sql("SELECT count(*) AS n FROM items", root=tmp_path).n[0] == 3
    finally:
        proc.join(60)


def _write_many(root: str, prefix: str, count: int, start) -> None:
    start.wait()
    for i in range(count):
        write_dataset(
            f"{prefix}_{i}", [{"i": i, "who": prefix}], produced_by=prefix, root=Path(root)
        )


def test_concurrent_writers(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    start = ctx.Barrier(2)
    procs = [
        ctx.Process(target=_write_many, args=(str(tmp_path), prefix, 10, start))
        for prefix in ("left", "right")
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0]

    names = [f"{prefix}_{i}" for prefix in ("left", "right") for i in range(10)]
    assert list_datasets(tmp_path) == sorted(names)
    assert set(names) <= views(tmp_path)
    lineage = sql("SELECT dataset, produced_by FROM lineage", root=tmp_path)
    assert sorted(lineage.dataset) == sorted(names)
    for name in names:
        assert sql(f"SELECT who FROM {name}", root=tmp_path).who.tolist() == [name.split("_")[0]]
