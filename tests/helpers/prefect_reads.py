"""Reading what a flow left on the Prefect server, for assertions."""

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
