"""Model versions: atomic publish, catalog rows, lineage from datasets to models and back."""

import shutil

import pytest

from flywheel.store import (
    ModelNotRegistered,
    list_model_versions,
    list_models,
    read_model,
    refresh_catalog,
    save_model_version,
    sql,
    write_dataset,
)
from flywheel.store.models import validate_derived_model_name

ROWS = [{"prompt": "p", "chosen": "a", "rejected": "b"}]


def _build(folder):
    (folder / "weights.bin").write_bytes(b"123")
    return {"accuracy": 0.75}


def test_model_version_published_with_lineage(tmp_path):
    pairs = write_dataset("pairs", ROWS, produced_by="run-1", root=tmp_path)
    model = save_model_version(
        "reward-bt", _build, kind="reward-bt", produced_by="run-2", inputs=[pairs], root=tmp_path
    )
    assert read_model("reward-bt", root=tmp_path) == model
    assert model.meta["metrics"] == {"accuracy": 0.75}
    row = sql("select * from models", root=tmp_path).iloc[0].to_dict()
    assert [row["name"], row["version"], row["produced_by"]] == [
        "reward-bt",
        model.version,
        "run-2",
    ]
    lineage = sql("select * from lineage where kind = 'model'", root=tmp_path)
    assert lineage[["input_dataset", "input_version", "input_kind"]].values.tolist() == [
        ["pairs", pairs.version, "dataset"]
    ]
    # a dataset made from the model names it as a model input
    scored = write_dataset("scored", ROWS, produced_by="run-3", inputs=[model], root=tmp_path)
    back = sql(f"select * from lineage where version = '{scored.version}'", root=tmp_path)
    assert back[["input_dataset", "input_kind"]].values.tolist() == [["reward-bt", "model"]]


def test_failed_build_publishes_nothing(tmp_path):
    def broken(folder):
        (folder / "half.bin").write_bytes(b"1")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError, match="killed"):
        save_model_version("reward-bt", broken, kind="reward-bt", root=tmp_path)
    assert list_model_versions("reward-bt", root=tmp_path) == []
    assert not list((tmp_path / "_models" / "reward-bt").iterdir())
    with pytest.raises(ModelNotRegistered, match="no registered model 'reward-bt'"):
        read_model("reward-bt", root=tmp_path)


def test_refresh_catalog_rebuilds_model_rows(tmp_path):
    model = save_model_version("rm", _build, kind="reward-bt", produced_by="r", root=tmp_path)
    shutil.rmtree(tmp_path / "lake")
    refresh_catalog(tmp_path)
    refresh_catalog(tmp_path)  # twice: no duplicate rows
    assert sql("select version from models", root=tmp_path)["version"].tolist() == [model.version]
    assert len(sql("select * from lineage where kind = 'model'", root=tmp_path)) == 1


def test_bad_model_name_is_explained(tmp_path):
    with pytest.raises(ValueError, match="invalid model name 'Reward BT'"):
        save_model_version("Reward BT", _build, kind="x", root=tmp_path)


@pytest.mark.parametrize("bad", ["rm\n", "rm\r", "rm\r\n", "rm ", "\nrm", "1rm", "a" * 64, "../x"])
def test_model_names_must_match_in_full(tmp_path, bad):
    with pytest.raises(ValueError, match="invalid model name") as info:
        save_model_version(bad, _build, kind="x", root=tmp_path)
    assert repr(bad) in str(info.value)
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("bad", ["../../x", "../x", "a/b", "/tmp/x", "v1\n", "", "failed"])
def test_model_versions_cannot_leave_the_models_folder(tmp_path, bad):
    built = []

    def build(folder):
        built.append(folder)
        return {}

    with pytest.raises(ValueError, match="invalid model version") as info:
        save_model_version("rm", build, kind="x", version=bad, root=tmp_path)
    assert repr(bad) in str(info.value)
    assert built == []
    assert not any(tmp_path.rglob("*"))


def test_planned_model_version_and_listing_in_full(tmp_path):
    model = save_model_version("rm", _build, kind="x", version="v1", root=tmp_path)
    assert read_model("rm", "v1", root=tmp_path) == model
    # a folder whose name only starts like a version is not one
    (tmp_path / "_models" / "rm" / "v2\n").mkdir()
    (tmp_path / "_models" / "rm" / "v2\n" / "_model.json").write_text(
        (tmp_path / "_models" / "rm" / "v1" / "_model.json").read_text()
    )
    (tmp_path / "_models" / "rm\n").mkdir()
    assert list_model_versions("rm", root=tmp_path) == ["v1"]
    assert list_models(tmp_path) == ["rm"]


def test_derived_model_names_name_the_field_and_its_limit():
    assert validate_derived_model_name("d-rm", field="dataset", value="d") == "d-rm"
    with pytest.raises(ValueError, match="dataset may have at most 60 characters; or set"):
        validate_derived_model_name(
            "a" * 61 + "-rm", field="dataset", value="a" * 61, hint="or set model_name"
        )
    rule = "^output: 'x' gives the model name 'x rm', which breaks the rule: a model name"
    with pytest.raises(ValueError, match=rule):
        validate_derived_model_name("x rm", field="output", value="x")
