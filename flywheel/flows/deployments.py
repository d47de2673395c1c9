"""Every deployment Flywheel serves, each on a nightly schedule."""

from __future__ import annotations

from pathlib import Path

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


def deployments(work_pool: str | None = None) -> list[RunnerDeployment]:
    """Every flow as a deployment, started by hand with
    `prefect deployment run synth/reference`; on `work_pool` when given, run from this
    folder (where `data/` is) by the pool's workers."""
    on_pool = {} if work_pool is None else {"work_pool_name": work_pool}
    folder = {} if work_pool is None else {"job_variables": {"working_dir": str(Path.cwd())}}
    return [
        d.entry.to_deployment(
            name=d.name.split("/", 1)[1],
            cron=NIGHTLY_UTC[d.name],
            description=(d.entry.__doc__ or "").strip().splitlines()[0],
            # run by module path: works from any folder once the package is installed
            entrypoint_type=EntrypointType.MODULE_PATH,
            **on_pool,
            **folder,
        )
        for d in DEPLOYMENTS
    ]


def serve_all() -> None:
    """Register every deployment with its schedule and run what comes due (blocks)."""
    import prefect

    # pause_on_shutdown=False: schedules stay active while the serve process restarts
    prefect.serve(*deployments(), pause_on_shutdown=False)


def work_on_pool(pool: str, name: str | None = None, limit: int | None = None) -> None:
    """Make the process work pool `pool` if it is missing, register every deployment on
    it (from `flywheel serve` or another pool before: a deployment runs in one place),
    and take runs from it until stopped (blocks). Each run gets a fresh Python process
    of its own, so none inherits a parent's torch threads or CUDA state."""
    import anyio
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists
    from prefect.workers.process import ProcessWorker

    with get_client(sync_client=True) as client:
        try:
            client.create_work_pool(WorkPoolCreate(name=pool, type="process"))
        except ObjectAlreadyExists:
            pass
    for deployment in deployments(work_pool=pool):
        deployment.apply()

    async def work() -> None:
        async with ProcessWorker(work_pool_name=pool, name=name, limit=limit) as worker:
            await worker.start()

    anyio.run(work)
