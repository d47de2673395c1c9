"""`world/bootstrap`: train the embedded world's tiny models and report their accuracy."""

from __future__ import annotations

from prefect import flow, task

from flywheel.flows.tracking import summary_artifact, tracked_run
from flywheel.world.bootstrap import BootstrapConfig, bootstrap_models, format_report, models_root


@task(name="train-world-models")
def train_world_models(config: BootstrapConfig) -> dict:
    return bootstrap_models(models_root(), config)


@flow(name="world", log_prints=True)
def bootstrap(params: BootstrapConfig | None = None) -> dict:
    """Train world-small and world-large (kept when already trained with the same config)."""
    params = params or BootstrapConfig()
    with tracked_run("world/bootstrap", params.model_dump()):
        report = train_world_models(params)
        figures = {
            f"{size} accuracy (all / hard)": f"{m['accuracy']['all']:.2f} / "
            f"{m['accuracy_hard']['all']:.2f}"
            for size, m in report["models"].items()
        }
        summary_artifact("world-bootstrap", "World models", figures, format_report(report))
        return report
