import json
from pathlib import Path

from flywheel.llm import TransformersBackend
from flywheel.world.bootstrap import format_report


def test_bootstrap_saves_loadable_models_with_report(world_models: Path) -> None:
    for size in ("small", "large"):
        folder = world_models / f"world-{size}"
        report = json.loads((folder / "bootstrap_report.json").read_text())
        assert set(report["accuracy"]) >= {"copy", "reverse", "sort", "count", "shift", "dedup"}
        assert 0.0 <= report["accuracy"]["all"] <= 1.0
        with TransformersBackend(folder) as backend:
            assert len(backend.generate(["copy abc="], max_new_tokens=4)) == 1
    small = json.loads((world_models / "world-small" / "bootstrap_report.json").read_text())
    large = json.loads((world_models / "world-large" / "bootstrap_report.json").read_text())
    assert large["parameters"] > 5 * small["parameters"]
    # a few seconds of training already move the loss below uniform (ln 64 = 4.16)
    assert small["train"]["loss"] < 3.6 and large["train"]["loss"] < 3.6
    table = format_report({"models": {"small": small, "large": large}})
    assert "world-small" in table and "world-large" in table


def test_bootstrap_is_cached_by_config(world_models: Path) -> None:
    from flywheel.world.bootstrap import BootstrapConfig, bootstrap_models

    before = (world_models / "world-large" / "model.safetensors").stat().st_mtime
    config = BootstrapConfig(small_budget_s=4, large_budget_s=8, eval_tasks=60)
    bootstrap_models(world_models, config)
    assert (world_models / "world-large" / "model.safetensors").stat().st_mtime == before
