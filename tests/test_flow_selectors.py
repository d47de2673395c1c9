"""`selectors/kmeans` under a real Prefect server: adapters and selector published with
lineage, an adapter added and removed by updating the selector only, bad input refused
in check-inputs."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from flywheel.flows.selectors import KmeansSelectorParams, kmeans_selector
from flywheel.selectors import AdapterLibrary, AdaptersSelector, folder_digest
from flywheel.store import list_datasets, read_dataset, read_model, sql
from tests.helpers.prefect_reads import lineage_inputs, task_runs

# peft calls a transformers method that transformers deprecates; nothing to act on here
pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated")
FAMILIES = ["reverse", "sort", "count"]


pytestmark = pytest.mark.usefixtures("one_thread")


def params(world_models: Path, **kw) -> KmeansSelectorParams:
    defaults = dict(
        base_model=str(world_models / "world-small"),
        families=FAMILIES,
        samples_per_task=30,
        k=2,
        per_centre=2,
        adapter_steps=8,
        selector_steps=8,
        eval_tasks=40,
    )
    return KmeansSelectorParams(**{**defaults, **kw})


def test_train_add_remove_publish_versions_with_lineage(prefect_api, world_models, data_dir):
    out = kmeans_selector(params(world_models))
    library, selector = read_model("kmeans-adapters"), read_model("kmeans-selector")
    assert out["selector"]["version"] == selector.version
    assert AdapterLibrary(library.path).names == FAMILIES
    assert (Path(library.path) / "_multitask" / "adapter_config.json").exists()
    metrics = selector.meta["metrics"]
    assert metrics["names"] == {"lora": FAMILIES, "head": FAMILIES}
    routing = metrics["routing_accuracy"]
    assert set(routing) == {"lora/kmeans", "lora/random", "head/kmeans", "head/random"}
    assert all(0 <= r["all"] <= 1 for r in routing.values())
    assert set(metrics["task_accuracy"]) == {
        "routed lora/kmeans",
        "routed lora/random",
        "routed head/kmeans",
        "routed head/random",
        "oracle routing",
        "base model",
        "multi-task adapter",
    }
    # the published selector loads from its version folder, against the published library
    system = AdaptersSelector.load(Path(selector.path) / "lora")
    assert system.library.folder == Path(library.path) and system.names == FAMILIES
    assert set(system.route(["sort abc=", "count abc="])) <= set(FAMILIES)

    base = ("world-small", "model")
    assert lineage_inputs("kmeans-adapters", library.version) == {
        base,
        ("selector_tasks", "dataset"),
    }
    assert lineage_inputs("kmeans-selector", selector.version) == {
        base,
        ("selector_samples", "dataset"),
        ("kmeans-adapters", "model"),
    }
    assert lineage_inputs("selector_eval", read_dataset("selector_eval").version) == {
        ("selector_samples", "dataset"),
        ("kmeans-adapters", "model"),
    }
    samples = read_dataset("selector_samples").to_pandas()
    assert samples.groupby(["selection", "family"]).size().tolist() == [4] * 6  # k*per_centre
    evaluation = read_dataset("selector_eval").to_pandas()
    assert len(evaluation) == 7 * metrics["eval_tasks"] and set(evaluation.family) == set(FAMILIES)
    runs = sql("select status from runs")
    assert runs["status"].tolist() == ["completed"]

    # add a family: a new library version (old adapters copied byte-identically), the
    # selector updated from the previous version
    kmeans_selector(params(world_models, add="shift"))
    library2, selector2 = read_model("kmeans-adapters"), read_model("kmeans-selector")
    assert library2.version != library.version and selector2.version != selector.version
    for name in FAMILIES:
        assert folder_digest(Path(library2.path) / name) == folder_digest(Path(library.path) / name)
    metrics2 = selector2.meta["metrics"]
    assert metrics2["mode"] == "add" and metrics2["names"]["lora"] == [*FAMILIES, "shift"]
    assert set(metrics2["old tasks routed accuracy lora"]) == {"before", "after"}
    assert ("kmeans-selector", "model") in lineage_inputs("kmeans-selector", selector2.version)

    # remove: the selector only; the library version stays the one it was
    kmeans_selector(params(world_models, remove="sort"))
    selector3 = read_model("kmeans-selector")
    metrics3 = selector3.meta["metrics"]
    assert metrics3["names"]["head"] == ["reverse", "count", "shift"]
    assert metrics3["library"] == f"kmeans-adapters@{library2.version}"
    assert AdaptersSelector.load(Path(selector3.path) / "head").names == metrics3["names"]["head"]

    # removing an adapter the latest selector does not route to fails before training
    with pytest.raises(
        ValueError, match=r"remove: kmeans-selector@\S+ routes to no adapter 'sort'"
    ):
        kmeans_selector(params(world_models, remove="sort"))

    # adding back a removed adapter routes to the library's own copy again, untouched
    kmeans_selector(params(world_models, add="sort"))
    library4, selector4 = read_model("kmeans-adapters"), read_model("kmeans-selector")
    assert "sort" in selector4.meta["metrics"]["names"]["head"]
    assert folder_digest(Path(library4.path) / "sort") == folder_digest(Path(library.path) / "sort")

    # the same fresh run again reuses its adapters instead of training them
    kmeans_selector(params(world_models))
    index = AdapterLibrary(read_model("kmeans-adapters").path)
    assert all("reused_from" in index.info(name) for name in FAMILIES)


@pytest.mark.parametrize(
    "bad, message",
    [
        (dict(families=["reverse", "spell"]), r"families: unknown task family \['spell'\]"),
        (dict(add="shift"), r"add: there is no kmeans-selector to update yet"),
        (dict(remove="sort"), r"remove: there is no kmeans-selector to update yet"),
        (dict(k=20, per_centre=2), r"k \* per_centre = 40 is more than samples_per_task=30"),
        (dict(add="spell"), r"add: unknown task family 'spell'"),
    ],
    ids=["unknown-family", "add-no-selector", "remove-no-selector", "k-too-large", "add-unknown"],
)
def test_bad_input_fails_in_check_inputs(prefect_api, world_models, data_dir, bad, message):
    with pytest.raises(ValueError, match=message):
        kmeans_selector(params(world_models, **bad))
    run = sql("select run_id, status from runs").iloc[0]
    assert run["status"] == "failed"
    assert asyncio.run(task_runs(run["run_id"])) == [("check-inputs", "FAILED")]
    assert not (data_dir / "_models").exists() and list_datasets() == []
