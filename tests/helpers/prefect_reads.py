"""Reading what a flow left, on the Prefect server and in the catalog, for assertions."""

from __future__ import annotations

import asyncio


def read_artifact(key: str) -> str:
    """The data of the latest artifact with `key`."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from prefect.client.schemas.sorting import ArtifactSort

    async def read() -> str:
        async with get_client() as client:
            found = await client.read_artifacts(
                artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])),
                sort=ArtifactSort.CREATED_DESC,  # other tests' runs may share the key
                limit=1,
            )
        return found[0].data

    return asyncio.run(read())


async def task_runs(flow_run_id: str) -> list[tuple[str, str]]:
    """(task name without its suffix, state type) of each task run of a flow run."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    async with get_client() as client:
        runs = await client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
        )
    return [(r.name.rsplit("-", 1)[0], r.state.type.value) for r in runs]


def lineage_inputs(name: str, version: str) -> set[tuple[str, str]]:
    """(input name, input kind) of each lineage row of `name@version`."""
    from flywheel.store import sql

    rows = sql(
        f"select input_dataset, input_kind from lineage where dataset = '{name}' "
        f"and version = '{version}'"
    )
    return {tuple(r) for r in rows.values.tolist()}
