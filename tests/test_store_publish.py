"""Publishing versions: the shared path of datasets and models (race, busy catalog)."""

import json
import multiprocessing
import time
from pathlib import Path

import pytest

from flywheel.store import (
    CatalogBusy,
    StoreError,
    lake,
    list_model_versions,
    list_versions,
    record_run,
    refresh_catalog,
    save_model_version,
    sql,
    write_dataset,
)

ROWS = [{"id": 1, "text": "a"}, {"id": 2, "text": "b"}]


def _build(folder: Path) -> dict:
    (folder / "weights.bin").write_bytes(b"123")
    return {"accuracy": 0.5}


def _hold_catalog(root: str, held, seconds: float) -> None:
    import sqlite3

    from flywheel.store.catalog import catalog_path

    catalog_path(Path(root)).parent.mkdir(parents=True, exist_ok=True)
    con = sqlite3.connect(catalog_path(Path(root)), isolation_level=None)
    con.execute("BEGIN EXCLUSIVE")  # a lock held far longer than any commit
    held.set()
    time.sleep(seconds)
    con.close()


def test_model_version_taken_while_building_is_refused(tmp_path):
    target = tmp_path / "_models" / "rm" / "v1"

    def build(folder: Path) -> dict:
        (folder / "weights.bin").write_bytes(b"mine")
        target.mkdir()
        (target / "weights.bin").write_bytes(b"theirs")
        return {}

    with pytest.raises(StoreError, match="model rm version v1 already exists"):
        save_model_version("rm", build, kind="x", version="v1", root=tmp_path)
    assert [p.name for p in target.parent.iterdir()] == ["v1"]
    assert (target / "weights.bin").read_bytes() == b"theirs"


def test_meta_is_kept_in_the_catalog_and_beside_a_model(tmp_path):
    ref = write_dataset("items", ROWS, version="v1", produced_by="run-1", root=tmp_path)
    meta = json.loads(sql("SELECT meta FROM versions", root=tmp_path).meta[0])
    assert meta == ref.meta
    assert [meta["name"], meta["version"], meta["produced_by"], meta["num_rows"]] == [
        "items",
        "v1",
        "run-1",
        2,
    ]
    model = save_model_version("rm", _build, kind="reward-bt", inputs=[ref], root=tmp_path)
    meta = json.loads((Path(model.path) / "_model.json").read_text())
    assert meta["kind"] == "reward-bt"
    assert meta["metrics"] == {"accuracy": 0.5}
    assert meta["inputs"] == [{"kind": "dataset", "name": "items", "version": "v1"}]


def test_busy_catalog_writes_no_dataset_and_leaves_models_for_refresh(tmp_path, monkeypatch):
    record_run("r1", "synth", {}, "running", root=tmp_path)  # the lake, then held
    ctx = multiprocessing.get_context("spawn")
    held = ctx.Event()
    proc = ctx.Process(target=_hold_catalog, args=(str(tmp_path), held, 120.0))
    proc.start()
    try:
        assert held.wait(60)
        monkeypatch.setattr(lake, "LOCKED_WAIT_S", 0.0)
        with pytest.raises(CatalogBusy, match="stayed locked"):
            write_dataset("items", ROWS, version="v1", root=tmp_path)
        with pytest.raises(CatalogBusy, match="the model itself is safely written at .*rm"):
            save_model_version("rm", _build, kind="x", version="v1", root=tmp_path)
    finally:
        proc.terminate()
        proc.join(60)
    monkeypatch.setattr(lake, "LOCKED_WAIT_S", 60.0)
    assert list_versions("items", root=tmp_path) == []  # one transaction: none of it
    assert list_model_versions("rm", root=tmp_path) == ["v1"]
    refresh_catalog(tmp_path)
    assert sql("SELECT version FROM models", root=tmp_path)["version"].tolist() == ["v1"]
