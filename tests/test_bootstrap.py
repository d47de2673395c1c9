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
    agent = json.loads((world_models / "shop-agent" / "bootstrap_report.json").read_text())
    if agent["config"]["shop_agent_eval_intents"]:
        assert 0.0 <= agent["eval"]["sampled"]["success"] <= 1.0
        assert agent["eval"]["expert"]["reward"] > 0.7  # the expert it imitates is good
    with TransformersBackend(world_models / "shop-agent") as backend:
        assert len(backend.generate(["task: small red mug under 9\nhome\naction: "])) == 1
    table = format_report({"models": {"small": small, "large": large}, "shop_agent": agent})
    assert "world-small" in table and "world-large" in table and "shop-agent" in table


def test_bootstrap_is_cached_by_config(world_models: Path) -> None:
    from flywheel.world.bootstrap import BootstrapConfig, bootstrap_models

    weights = [world_models / m / "model.safetensors" for m in ("world-large", "shop-agent")]
    before = [w.stat().st_mtime for w in weights]
    # the config the session fixture trained with
    report = json.loads((world_models / "shop-agent" / "bootstrap_report.json").read_text())
    config = BootstrapConfig(**report["config"])
    bootstrap_models(world_models, config)
    assert [w.stat().st_mtime for w in weights] == before
    # the agent's own fields are its cache key: a new agent budget keeps the world models
    changed = config.model_copy(update={"shop_agent_budget_s": 1.0, "shop_agent_eval_intents": 0})
    from flywheel.world.bootstrap import _cached

    assert _cached(world_models / "world-large", changed, "large") is not None
    assert _cached(world_models / "shop-agent", changed, "shop-agent") is None
