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

# The night in order, which follows the data: models, then synthesis, then reward models
# on it, then the policies and decoders that use them. Times are UTC cron lines.
NIGHTLY: list[tuple[Deployment, str]] = [
    (BOOTSTRAP, "0 1 * * *"),
    (REFERENCE, "0 2 * * *"),
    (ARMAP, "30 2 * * *"),
    (TRAIN, "0 3 * * *"),
    (RELABEL, "30 3 * * *"),
    (BEST_OF_N, "0 4 * * *"),
    (REFLEXION, "15 4 * * *"),
    (MCTS, "30 4 * * *"),
    (GROUP_ROBUST, "0 5 * * *"),
    (KMEANS_SELECTOR, "30 5 * * *"),
    (CO_LLM, "0 6 * * *"),
    (COLLAB, "30 6 * * *"),
    (HYBRID, "0 7 * * *"),
]
DEPLOYMENTS: list[Deployment] = [d for d, _ in NIGHTLY]

# `<flow>/<deployment>` names: `prefect deployment run synth/reference` starts one by hand
FLOWS: dict[str, Flow] = {d.name: d.entry for d in DEPLOYMENTS}
NIGHTLY_UTC: dict[str, str] = {d.name: cron for d, cron in NIGHTLY}


def deployments() -> list[RunnerDeployment]:
    """Every flow as a deployment, started by hand with
    `prefect deployment run synth/reference`."""
    return [
        d.entry.to_deployment(
            name=d.name.split("/", 1)[1],
            cron=NIGHTLY_UTC[d.name],
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
