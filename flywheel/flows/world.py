"""`world/bootstrap`: train the embedded world's tiny models and report their accuracy."""

from __future__ import annotations

from prefect import task

from flywheel.flows.tracking import Deployment, FlowRun
from flywheel.world.bootstrap import (
    BootstrapConfig,
    bootstrap_models,
    format_report,
    models_root,
    summary_figures,
)


@task(name="train-world-models")
def train_world_models(config: BootstrapConfig) -> dict:
    return bootstrap_models(models_root(), config)


BOOTSTRAP = Deployment("world/bootstrap", "World models", BootstrapConfig)


@BOOTSTRAP.flow
def bootstrap(params: BootstrapConfig, run: FlowRun) -> dict:
    """Train world-small, world-large and shop-agent for a fixed number of steps (kept when
    already trained so; `force` retrains); a world model below its accuracy floor is not
    published and fails the run."""
    report = train_world_models(params)
    figures = summary_figures(report, params)
    run.summary(figures, format_report(report))
    return report
