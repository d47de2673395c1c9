"""Every deployment Flywheel serves, each on a nightly schedule."""

from __future__ import annotations

from prefect import Flow
from prefect.deployments.runner import EntrypointType, RunnerDeployment

from flywheel.flows.align import GROUP_ROBUST
from flywheel.flows.armap import ARMAP
from flywheel.flows.decode.co_llm import CO_LLM
from flywheel.flows.decode.collab import COLLAB
from flywheel.flows.decode.hybrid import HYBRID
from flywheel.flows.plan import BEST_OF_N, MCTS, REFLEXION
from flywheel.flows.relabel import RELABEL
from flywheel.flows.reward import TRAIN
from flywheel.flows.selectors import KMEANS_SELECTOR
from flywheel.flows.synth import REFERENCE
from flywheel.flows.tracking import Deployment
from flywheel.flows.world import BOOTSTRAP

# In the nightly order, which follows the data: models, then synthesis, then reward
# models on it, then the policies and decoders that use them.
DEPLOYMENTS: list[Deployment] = [
    BOOTSTRAP,
    REFERENCE,
    ARMAP,
    TRAIN,
    RELABEL,
    BEST_OF_N,
    REFLEXION,
    MCTS,
    GROUP_ROBUST,
    KMEANS_SELECTOR,
    CO_LLM,
    COLLAB,
    HYBRID,
]

# `<flow>/<deployment>` names: `prefect deployment run synth/reference` starts one by hand
FLOWS: dict[str, Flow] = {d.name: d.entry for d in DEPLOYMENTS}
NIGHTLY_UTC: dict[str, str] = {d.name: d.nightly_utc for d in DEPLOYMENTS}


def deployments() -> list[RunnerDeployment]:
    """Every flow as a deployment, started by hand with
    `prefect deployment run synth/reference`."""
    return [
        d.entry.to_deployment(
            name=d.name.split("/", 1)[1],
            cron=d.nightly_utc,
            description=(d.entry.__doc__ or "").strip().splitlines()[0],
            # run by module path: works from any folder once the package is installed
            entrypoint_type=EntrypointType.MODULE_PATH,
        )
        for d in DEPLOYMENTS
    ]


def serve_all() -> None:
    """Register every deployment with its schedule and run what comes due (blocks)."""
    import prefect

    # pause_on_shutdown=False: schedules stay active while the serve process restarts
    prefect.serve(*deployments(), pause_on_shutdown=False)
