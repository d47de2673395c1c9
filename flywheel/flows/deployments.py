"""Every deployment Flywheel serves, each on a nightly schedule."""

from __future__ import annotations

from prefect.deployments.runner import EntrypointType, RunnerDeployment

from flywheel.flows.align import group_robust_flow
from flywheel.flows.armap import armap_flow, best_of_n_flow, mcts_flow, reflexion_flow
from flywheel.flows.decode import co_llm_flow, collab_flow, hybrid_flow
from flywheel.flows.relabel import relabel
from flywheel.flows.reward import train_flow
from flywheel.flows.selectors import kmeans_selector
from flywheel.flows.synth import reference
from flywheel.flows.world import bootstrap

# The nightly order follows the data: models, then synthesis, then reward models on it,
# then the policies and decoders that use them.
NIGHTLY_UTC = {
    "world/bootstrap": "0 1 * * *",
    "synth/reference": "0 2 * * *",
    "synth/armap": "30 2 * * *",
    "reward/train": "0 3 * * *",
    "reward/relabel": "30 3 * * *",
    "plan/best-of-n": "0 4 * * *",
    "plan/reflexion": "15 4 * * *",
    "plan/mcts": "30 4 * * *",
    "align/group-robust": "0 5 * * *",
    "selectors/kmeans": "30 5 * * *",
    "decode/co-llm": "0 6 * * *",
    "decode/collab": "30 6 * * *",
    "decode/hybrid": "0 7 * * *",
}


# `<flow>/<deployment>` names: `prefect deployment run synth/reference` starts one by hand
FLOWS = {
    "world/bootstrap": bootstrap,
    "synth/reference": reference,
    "synth/armap": armap_flow,
    "reward/train": train_flow,
    "reward/relabel": relabel,
    "plan/best-of-n": best_of_n_flow,
    "plan/reflexion": reflexion_flow,
    "plan/mcts": mcts_flow,
    "align/group-robust": group_robust_flow,
    "selectors/kmeans": kmeans_selector,
    "decode/co-llm": co_llm_flow,
    "decode/collab": collab_flow,
    "decode/hybrid": hybrid_flow,
}


def deployments() -> list[RunnerDeployment]:
    """Every flow as a deployment, started by hand with
    `prefect deployment run synth/reference`."""
    out = []
    for full_name, flow in FLOWS.items():
        name = full_name.split("/", 1)[1]
        out.append(
            flow.to_deployment(
                name=name,
                cron=NIGHTLY_UTC[full_name],
                description=(flow.__doc__ or "").strip().splitlines()[0],
                # run by module path: works from any folder once the package is installed
                entrypoint_type=EntrypointType.MODULE_PATH,
            )
        )
    return out


def serve_all() -> None:
    """Register every deployment with its schedule and run what comes due (blocks)."""
    import prefect

    # pause_on_shutdown=False: schedules stay active while the serve process restarts
    prefect.serve(*deployments(), pause_on_shutdown=False)
