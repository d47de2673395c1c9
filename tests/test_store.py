import json
import multiprocessing
import re
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import flywheel.store.catalog as catalog
import flywheel.store.datasets as datasets
import flywheel.store.naming as naming
import flywheel.store.publish as publish
from flywheel.store import (
    CatalogBusy,
    DatasetNotFound,
    DatasetVersionExists,
    InvalidDatasetName,
    StoreError,
    data_root,
    failed_name,
    lake,
    list_datasets,
    list_versions,
    read_dataset,
    record_run,
    refresh_catalog,
    sql,
    validate_name,
    write_dataset,
)
from tests.helpers import two_writers

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
    # the lake table's parquet files under the lake's data path hold the version's rows
    (file,) = ref.files()
    assert Path(file).is_relative_to(tmp_path / "lake" / "files")
    assert pq.read_table(file).to_pylist() == ROWS
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
    assert list_datasets() == ["x"]
    assert (tmp_path / "elsewhere" / "lake" / "catalog.sqlite").is_file()
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


def test_many_rows_keep_their_order_in_every_reader(tmp_path):
    rows = pa.table({"i": range(300_000), "text": [f"row {i}" for i in range(300_000)]})
    ref = write_dataset("many", rows, root=tmp_path)
    assert ref.to_arrow().column("i").to_pylist() == list(range(300_000))
    hf = ref.to_hf(cache_dir=str(tmp_path / "hf_cache"))
    assert hf["i"] == list(range(300_000))
    assert sql("SELECT count(*) AS n FROM many", root=tmp_path).n[0] == 300_000


_DIE_MID_WRITE = """
import os, sys
from pathlib import Path
from flywheel.store import publish, write_dataset

def die(con, name):  # after the version's table and rows are written, before the commit
    os._exit(9)

publish._create_latest_view = die
write_dataset("crashed", [{"id": i} for i in range(1000)], version="v1", root=Path(sys.argv[1]))
"""


def test_a_writer_killed_mid_write_leaves_no_version(tmp_path):
    write_dataset("other", ROWS, root=tmp_path)  # so the catalog exists
    died = subprocess.run([sys.executable, "-c", _DIE_MID_WRITE, str(tmp_path)], timeout=120)
    assert died.returncode == 9
    assert list_versions("crashed", root=tmp_path) == []
    assert "crashed" not in list_datasets(tmp_path)
    tables = sql("SELECT table_name FROM duckdb_tables() WHERE database_name = 'lake'", tmp_path)
    assert "crashed__v1" not in set(tables.table_name)
    assert "crashed" not in views(tmp_path)
    with pytest.raises(DatasetNotFound):
        read_dataset("crashed", root=tmp_path)
    # the version can be written again, whole
    ref = write_dataset("crashed", ROWS, version="v1", root=tmp_path)
    assert ref.to_arrow().to_pylist() == ROWS
    assert sql("SELECT count(*) AS n FROM lineage WHERE dataset = 'crashed'", tmp_path).n[0] == 1


def test_a_failed_write_leaves_no_version(tmp_path, monkeypatch):
    def fail(*args):
        raise OSError("disk full")

    monkeypatch.setattr(publish, "_add_lineage", fail)
    with pytest.raises(OSError, match="disk full"):
        write_dataset("failing", ROWS, version="v1", root=tmp_path)
    monkeypatch.undo()
    assert list_versions("failing", root=tmp_path) == []
    assert not {"failing", "failing__v1"} & views(tmp_path)


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
    assert naming.VERSION_RE.match(first.version)
    assert list_versions("items", root=tmp_path) == [first.version, second.version]


@pytest.mark.parametrize(
    "bad",
    [
        "../x",
        "A",
        "a/b",
        "",
        "1abc",
        "has space",
        "runs",
        "abc\n",
        "abc\r",
        "abc\r\n",
        "abc\t",
        "abc ",
        "\nabc",
        "a__b",
        "a_",
        "x__failed__failed",
        "a" * 64,
    ],
)
def test_invalid_names(tmp_path, bad):
    with pytest.raises(InvalidDatasetName, match=r"\^\[a-z\]\[a-z0-9\]\*") as info:
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
    with pytest.raises(InvalidDatasetName, match="answers__failed__failed"):
        failed_name("answers__failed")


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


def test_refresh_is_idempotent_and_remakes_latest_views(tmp_path):
    a = write_dataset("a", ROWS, root=tmp_path)
    write_dataset("b", ROWS, inputs=[a], root=tmp_path)
    with catalog._connect(tmp_path) as con:  # sql() only reads
        con.execute("DROP VIEW b")
        con.execute("CREATE VIEW mine AS SELECT 1 AS one")
    assert "b" not in views(tmp_path)
    refresh_catalog(tmp_path)
    refresh_catalog(tmp_path)
    assert {"a", "b", "mine"} <= views(tmp_path)  # views the user made are left alone
    assert sql("SELECT count(*) AS n FROM b", root=tmp_path).n[0] == 3
    lineage = sql("SELECT dataset, version, input_dataset FROM lineage", root=tmp_path)
    assert len(lineage) == 2
    assert lineage[lineage.dataset == "b"].input_dataset.tolist() == ["a"]


def test_sql_creates_catalog(tmp_path):
    assert sql("SELECT count(*) AS n FROM runs", root=tmp_path).n[0] == 0
    assert sql("SELECT count(*) AS n FROM versions", root=tmp_path).n[0] == 0


def test_bookkeeping_rows_stay_in_the_catalog_database(tmp_path):
    # runs, lineage, versions and models rows are inlined: no parquet file per insert or
    # update; a dataset version's rows are all in parquet files
    for i in range(5):
        record_run(f"r{i}", "synth", {}, "running", root=tmp_path)
        record_run(f"r{i}", "synth", {}, "completed", root=tmp_path)
    ref = write_dataset("items", ROWS, root=tmp_path)
    with lake.connect(tmp_path, read_only=True) as con:
        for table in ("runs", "lineage", "versions"):
            files = con.execute(f"SELECT count(*) FROM ducklake_list_files('lake', '{table}')")
            assert files.fetchone() == (0,), table
    assert pq.read_table(ref.files()).num_rows == 3
    assert sql("SELECT count(*) AS n FROM runs WHERE status = 'completed'", root=tmp_path).n[0] == 5


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


def test_a_lake_made_before_model_calls_gets_the_column(tmp_path, monkeypatch):
    old_tables = re.sub(
        r",\s*-- JSON: per backend[^\n]*\n\s*model_calls VARCHAR", "", catalog._TABLES
    )
    assert "model_calls" not in old_tables and "host VARCHAR" in old_tables
    monkeypatch.setattr(catalog, "_TABLES", old_tables)
    old_run = "INSERT INTO runs (run_id, flow, status) VALUES ('old', 'synth', 'completed')"
    catalog.write(tmp_path, lambda con: con.execute(old_run))
    lake.close_all()  # as a new process would open it
    monkeypatch.undo()
    calls = [{"backend": "openai", "model": "m", "requests": 3}]
    record_run("new", "synth", {}, "completed", root=tmp_path, model_calls=calls)
    record_run("new", "synth", {}, "completed", root=tmp_path)  # kept when not given
    runs = sql("SELECT run_id, model_calls FROM runs ORDER BY run_id", root=tmp_path)
    assert list(runs.run_id) == ["new", "old"]
    assert json.loads(runs.model_calls[0]) == calls and pd.isna(runs.model_calls[1])


def test_duckdb_cli_reads_catalog(tmp_path):
    cli = Path(sys.executable).parent / "duckdb"
    if not cli.exists():
        pytest.skip("duckdb CLI (package duckdb-cli) not installed")
    write_dataset("items", ROWS, version="v1", root=tmp_path)
    setup = ";\n".join(lake.shell_statements(tmp_path)) + ";"
    out = subprocess.run(
        [str(cli), "-csv", "-noheader", "-cmd", setup],
        input="select count(*) from items;\nselect count(*) from items__v1;\n",
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert out.stdout.split() == ["3", "3"]


def _hold_catalog(catalog: str, held, seconds: float) -> None:
    import sqlite3

    con = sqlite3.connect(catalog, isolation_level=None)
    con.execute("BEGIN EXCLUSIVE")  # what no DuckLake writer does for long: a stuck lock
    held.set()
    time.sleep(seconds)
    con.close()


def test_busy_catalog_waits_then_raises(tmp_path, monkeypatch):
    write_dataset("items", ROWS, root=tmp_path)
    ctx = multiprocessing.get_context("spawn")
    held = ctx.Event()
    proc = ctx.Process(target=_hold_catalog, args=(str(catalog.catalog_path(tmp_path)), held, 9.0))
    proc.start()
    try:
        assert held.wait(60)
        monkeypatch.setattr(lake, "LOCKED_WAIT_S", 0.0)
        with pytest.raises(CatalogBusy, match="catalog.sqlite stayed locked"):
            record_run("r1", "synth", {}, "running", root=tmp_path)
        monkeypatch.setattr(lake, "LOCKED_WAIT_S", 60.0)
        # Waits for the other process to let go, then works.
        record_run("r1", "synth", {}, "running", root=tmp_path)
        assert sql("SELECT count(*) AS n FROM runs", root=tmp_path).n[0] == 1
    finally:
        proc.join(60)


def test_concurrent_writers(tmp_path):
    two_writers.in_two_processes(two_writers.write_many, tmp_path)
    two_writers.check_many(tmp_path)


def test_two_processes_writing_one_dataset_land_every_version_once(tmp_path):
    two_writers.in_two_processes(two_writers.write_versions, tmp_path)
    two_writers.check_versions(tmp_path)


def test_two_processes_writing_one_version_at_once_land_it_once(tmp_path):
    assert two_writers.one_version_exit_codes(tmp_path, "v1") == [0, 3]
    (winner,) = sql("SELECT produced_by FROM versions", root=tmp_path).produced_by
    rows = read_dataset("clash", "v1", root=tmp_path).to_arrow().to_pylist()
    assert rows == [{"who": winner, "row": r} for r in range(two_writers.COUNT)]


# --- names and versions: full matches only, and no two catalog views alike ---


@pytest.mark.parametrize(
    "bad", ["v1\n", "v1\r", "v1\r\n", "\nv1", "v1 ", "../../x", "a/b", "", "failed", "failed__v1"]
)
def test_invalid_versions_write_nothing(tmp_path, bad):
    with pytest.raises(ValueError, match="invalid dataset version") as info:
        write_dataset("items", ROWS, version=bad, root=tmp_path)
    assert repr(bad) in str(info.value)
    assert not any(tmp_path.iterdir())


def test_old_layout_listing_skips_folders_whose_names_end_in_a_newline(tmp_path):
    for folder in ("items/v1", "items/v2\n", "items\n/v1", "items/.tmp-x"):
        (tmp_path / folder).mkdir(parents=True)
        (tmp_path / folder / naming.META_FILE).write_text("{}")
    assert datasets.old_version_folders(tmp_path) == [tmp_path / "items" / "v1"]
    with pytest.raises(DatasetNotFound, match="flywheel store migrate"):
        read_dataset("items", root=tmp_path)


def _valid(check, text: str) -> bool:
    try:
        check(text)
    except ValueError:
        return False
    return True


def _first_collision(names: list[str], versions: list[str]) -> tuple | None:
    """Two different things the catalog would give the same name, or None."""
    owner: dict[str, tuple] = {table: ("table", table) for table in naming.RESERVED_NAMES}
    for name in names:
        views = [(name, (name, None))] + [(f"{name}__{v}", (name, v)) for v in versions]
        for view, origin in views:
            if owner.setdefault(view, origin) != origin:
                return view, owner[view], origin
    return None


def _strings(fragments: list[str], parts: int) -> list[str]:
    out = {""}
    for _ in range(parts):
        out |= {s + f for s in out for f in fragments}
    return sorted(out - {""})


def test_dataset_views_never_collide_with_version_views():
    fragments = ["a", "b1", "_", "__", "f", "failed", "__failed", "v1"]
    names = [n for n in _strings(fragments, 4) if _valid(validate_name, n)]
    versions = [v for v in _strings(fragments, 3) if _valid(naming.validate_version, v)]
    versions.append(naming.new_version())
    assert {"a", "a_b1", "a__failed", "a_failed", "af"} <= set(names)
    assert {"v1", "_", "a__b1", "failed_v1", "failedv1", "__failed"} <= set(versions)
    assert _first_collision(names, versions) is None
    # the check can fail: the old rules let dataset `a`'s version `failed` read as `a__failed`
    old_name, old_version = r"[a-z][a-z0-9_]{0,62}", r"[a-z0-9_]{1,80}"
    old_names = [n for n in _strings(fragments, 3) if re.fullmatch(old_name, n)]
    old_versions = [v for v in _strings(fragments, 2) if re.fullmatch(old_version, v)]
    assert _first_collision(old_names, old_versions) is not None


def test_failed_dataset_and_failed_version_keep_their_own_views(tmp_path):
    write_dataset("x", [{"who": "x"}], version="v1", root=tmp_path)
    write_dataset(failed_name("x"), [{"who": "failed"}], version="v1", root=tmp_path)
    for version in ("failed", "failed__v1"):
        with pytest.raises(ValueError, match="belong to the dataset '<name>__failed'"):
            write_dataset("x", [{"who": "clash"}], version=version, root=tmp_path)
    refresh_catalog(tmp_path)
    expected = {"x": "x", "x__v1": "x", "x__failed": "failed", "x__failed__v1": "failed"}
    for view, who in expected.items():
        assert sql(f"SELECT who FROM {view}", root=tmp_path).who.tolist() == [who]


def test_versions_that_read_like_a_failed_suffix_elsewhere_are_fine(tmp_path):
    ref = write_dataset("items", ROWS, version="failed_v1", root=tmp_path)
    assert sql("SELECT count(*) AS n FROM items__failed_v1", root=tmp_path).n[0] == 3
    assert read_dataset("items", "failed_v1", root=tmp_path) == ref


def test_output_names_check_the_names_derived_from_them():
    check = naming.validate_output_name
    assert check("a" * 54, field="output", suffixes=("_feedback",), failed=True) == "a" * 54
    with pytest.raises(InvalidDatasetName, match="output may have at most 54 characters") as info:
        check("a" * 55, field="output", suffixes=("_feedback",), failed=True)
    assert "'" + "a" * 55 + "_feedback'" in str(info.value)
    with pytest.raises(InvalidDatasetName, match="queue may have at most 55 characters"):
        check("a" * 56, field="queue", failed=True)
    with pytest.raises(InvalidDatasetName, match="^output: invalid dataset name 'A'"):
        check("A", field="output")
    with pytest.raises(InvalidDatasetName, match="gives the dataset name 'x__failed_feedback'"):
        check("x__failed", field="output", suffixes=("_feedback",))
    for bad in ["a" * 60, "x__failed", "abc_def_" + "g" * 50]:
        with pytest.raises(InvalidDatasetName) as info:
            check(bad, field="output", suffixes=("_feedback",), failed=True)
        suggestion = str(info.value).rsplit("try ", 1)[1].strip("'")
        assert check(suggestion, field="output", suffixes=("_feedback",), failed=True)


def test_derived_versions_name_the_field_and_its_limit():
    check = naming.validate_derived_version
    assert check("m_v1", field="model_name", value="m") == "m_v1"
    with pytest.raises(ValueError, match="model_name may have at most 78 characters"):
        check("m" * 79 + "_v", field="model_name", value="m" * 79)
    with pytest.raises(ValueError, match="^model_name: 'failed-' gives the version 'failed__v1'"):
        check("failed__v1", field="model_name", value="failed-")


# --- text that is not valid UTF-8 ---


def _bad_strings(values: list[bytes], large: bool = False) -> pa.Array:
    """A string array holding the raw bytes as given, valid UTF-8 or not (arrow's view
    does not check, the way buffers from elsewhere are not checked)."""
    binary, text = (pa.large_binary(), pa.large_string()) if large else (pa.binary(), pa.string())
    return pa.array(values, type=binary).view(text)


def _refused(tmp_path, rows, match: str, **kwargs) -> None:
    with pytest.raises(datasets.InvalidText, match=match):
        write_dataset("items", rows, root=tmp_path, **kwargs)
    assert not (tmp_path / "items").exists()
    assert list_versions("items", root=tmp_path) == []


@pytest.mark.parametrize("large", [False, True])
def test_invalid_utf8_is_refused_naming_column_and_row(tmp_path, large):
    table = pa.table({"id": [0, 1, 2], "text": _bad_strings([b"ok", b"caf\xe9", b"x"], large)})
    _refused(tmp_path, table, r"column 'text' row 1: the text is not valid UTF-8 \('utf-8' codec")


def test_invalid_utf8_is_found_deep_in_a_long_chunked_column(tmp_path):
    values = [b"fine"] * 1000
    values[737] = b"\xff\xfe"
    first = pa.table({"text": _bad_strings([b"a", b"b"])})
    table = pa.concat_tables([first, pa.table({"text": _bad_strings(values)})])
    assert table.column("text").num_chunks == 2
    _refused(tmp_path, table, "column 'text' row 739:")


def test_invalid_utf8_in_nested_columns_is_refused(tmp_path):
    # a list<string> column like the feedback dataset's, and a struct with a text field
    tags = pa.ListArray.from_arrays(
        pa.array([0, 1, 1, 3], pa.int32()), _bad_strings([b"a", b"b", b"\xc3("])
    )
    _refused(tmp_path, pa.table({"id": [0, 1, 2], "tags": tags}), "column 'tags' row 2:")
    note = pa.StructArray.from_arrays(
        [_bad_strings([b"ok", b"\x80"]), pa.array([1, 2])], names=["text", "n"]
    )
    _refused(tmp_path, pa.table({"note": note}), "column 'note' row 1:")


def test_lone_surrogates_are_refused_naming_column_and_row(tmp_path):
    rows = [{"id": 0, "text": "ok"}, {"id": 1, "text": "bad \udcff byte"}]
    _refused(tmp_path, rows, r"column 'text' row 1: the text holds '\\udcff', a lone surrogate")
    nested = [{"tags": ["a"]}, {"tags": ["b"]}, {"tags": ["c", "\ud800"]}]
    _refused(tmp_path, nested, "column 'tags' row 2:")
    # pandas' own string dtype refuses it already; an object column holds it as it is
    frame = pd.DataFrame({"id": [0, 1], "text": pd.Series(["fine", "\udcfe"], dtype=object)})
    _refused(tmp_path, frame, "column 'text' row 1:")
    schema = pa.schema([("text", pa.string())])
    _refused(tmp_path, [{"text": "\udc80"}], "column 'text' row 0:", schema=schema)


def test_binary_that_cannot_cast_to_text_names_the_column(tmp_path):
    table = pa.table({"id": [1], "raw": pa.array([b"\xff"])})
    schema = pa.schema([("id", pa.int64()), ("raw", pa.string())])
    with pytest.raises(ValueError, match="column 'raw': cannot cast binary to string"):
        write_dataset("items", table, schema=schema, root=tmp_path)
    assert not (tmp_path / "items").exists()


def test_valid_unicode_text_round_trips(tmp_path):
    rows = [{"text": "café 日本 🙂", "tags": ["ünï", "ok"]}, {"text": None, "tags": []}]
    assert write_dataset("items", rows, root=tmp_path).to_arrow().to_pylist() == rows
    sliced = pa.table({"text": _bad_strings([b"\xff", b"ok", b"fine"])}).slice(1)
    assert write_dataset("sliced", sliced, root=tmp_path).to_arrow().column("text").to_pylist() == [
        "ok",
        "fine",
    ]


def test_a_store_with_the_old_duckdb_catalog_keeps_its_runs(tmp_path):
    # the catalog before the lake: data/flywheel.duckdb, its runs table without pid/host
    import duckdb

    old = duckdb.connect(str(tmp_path / "flywheel.duckdb"))
    old.execute(
        "CREATE TABLE runs (run_id VARCHAR PRIMARY KEY, flow VARCHAR, parameters VARCHAR, "
        "started TIMESTAMP, ended TIMESTAMP, status VARCHAR)"
    )
    old.execute(
        "INSERT INTO runs VALUES ('old-1', 'synth/reference', '{}', "
        "'2026-11-01 02:00:00', '2026-11-01 02:01:00', 'completed')"
    )
    old.close()
    record_run("new-1", "reward/train", {}, "running", root=tmp_path)
    record_run("new-2", "reward/train", {}, "running", root=tmp_path)  # copied once only
    runs = sql("SELECT run_id, flow, status, pid FROM runs ORDER BY run_id", root=tmp_path)
    assert runs.run_id.tolist() == ["new-1", "new-2", "old-1"]
    old_run = runs[runs.run_id == "old-1"].iloc[0]
    assert (old_run.flow, old_run.status) == ("synth/reference", "completed")
    assert pd.isna(old_run.pid)
