import json
from pathlib import Path

import pytest

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


def test_bootstrap_is_cached_by_what_was_trained(world_models: Path) -> None:
    from flywheel.world.bootstrap import SOURCE, BootstrapConfig, _cached, bootstrap_models

    weights = [world_models / m / "model.safetensors" for m in ("world-large", "shop-agent")]
    before = [w.stat().st_mtime for w in weights]
    # the config the session fixture trained with
    report = json.loads((world_models / "shop-agent" / "bootstrap_report.json").read_text())
    config = BootstrapConfig(**report["config"])
    bootstrap_models(world_models, config)
    assert [w.stat().st_mtime for w in weights] == before
    large = world_models / "world-large"
    # the agent's own fields are its cache key: new agent steps keep the world models
    changed = config.model_copy(update={"shop_agent_steps": 601})
    assert _cached(large, changed, "large") is not None
    assert _cached(world_models / "shop-agent", changed, "shop-agent") is None
    # forced, or trained by other code, or fewer steps than planned: not the same model
    assert _cached(large, config.model_copy(update={"force": True}), "large") is None
    entry = json.loads((large / "bootstrap_report.json").read_text())
    assert entry["source"] == SOURCE and entry["train"]["steps"] == config.large_steps
    copy = world_models.parent / "stale" / "world-large"
    copy.mkdir(parents=True)
    for stale in ({**entry, "source": "other code"}, {**entry, "train": {"steps": 25}}):
        (copy / "bootstrap_report.json").write_text(json.dumps(stale))
        assert _cached(copy, config, "large") is None


def test_bootstrap_trains_a_fixed_number_of_steps_deterministically(tmp_path: Path) -> None:
    from flywheel.world.bootstrap import BootstrapConfig, bootstrap_models

    config = BootstrapConfig(
        small_steps=30,
        large_steps=2,
        small_min_accuracy=0,
        large_min_accuracy=0,
        eval_tasks=12,
        shop_agent_steps=3,
        shop_agent_eval_intents=0,
    )
    first = bootstrap_models(tmp_path / "a", config)
    second = bootstrap_models(tmp_path / "b", config)
    for size in ("small", "large"):
        steps = first["models"][size]["train"]["steps"]
        assert steps == getattr(config, f"{size}_steps")
        assert first["models"][size]["train"]["loss"] == second["models"][size]["train"]["loss"]
    assert first["shop_agent"]["train"]["steps"] == 3
    small = (tmp_path / "a" / "world-small" / "model.safetensors").read_bytes()
    assert small == (tmp_path / "b" / "world-small" / "model.safetensors").read_bytes()


def test_bootstrap_refuses_to_publish_below_the_floor(tmp_path: Path) -> None:
    from flywheel.world.bootstrap import BelowAccuracyFloor, BootstrapConfig, bootstrap_models

    config = BootstrapConfig(small_steps=2, small_min_accuracy=0.5, eval_tasks=12)
    with pytest.raises(BelowAccuracyFloor) as err:
        bootstrap_models(tmp_path, config)
    message = str(err.value)
    assert "world-small reached held-out accuracy" in message
    assert "floor 0.50 (small_min_accuracy)" in message and "small_steps" in message
    assert not (tmp_path / "world-small").exists()
    assert not (tmp_path / "world-small.tmp").exists()
    assert not (tmp_path / "world-large").exists()  # stopped before training more


def test_cli_world_bootstrap_force_and_report(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from flywheel.cli import app

    env = {"FLYWHEEL_DATA_DIR": str(tmp_path)}
    runner = CliRunner()
    missing = runner.invoke(app, ["world", "report"], env=env)
    assert missing.exit_code == 1 and "flywheel world bootstrap" in missing.output
    refused = runner.invoke(app, ["world", "bootstrap", "--small-steps", "2"], env=env)
    assert refused.exit_code == 1 and "not published" in refused.output
    assert "Traceback" not in refused.output
