"""What every flow does around its work: record the run in the catalog, summarise it."""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Callable, Iterator
from datetime import UTC, datetime

from prefect.artifacts import create_markdown_artifact
from prefect.runtime import flow_run

from flywheel.store import (
    DatasetRef,
    list_datasets,
    list_versions,
    read_dataset,
    record_run,
    write_dataset,
)


def current_run_id() -> str:
    """The Prefect flow run id, or a local id when called outside a flow run."""
    return str(flow_run.id or f"local-{datetime.now(UTC):%Y%m%d%H%M%S%f}")


@contextlib.contextmanager
def tracked_run(flow: str, parameters: dict) -> Iterator[str]:
    """Record the run in the catalog's `runs` table as running, then completed or failed."""
    run_id = current_run_id()
    record_run(run_id, flow, parameters, "running", started=datetime.now(UTC))
    try:
        yield run_id
    except BaseException:
        record_run(run_id, flow, parameters, "failed", ended=datetime.now(UTC))
        raise
    record_run(run_id, flow, parameters, "completed", ended=datetime.now(UTC))


def summary_artifact(key: str, title: str, figures: dict, extra_markdown: str = "") -> None:
    """A markdown artifact: a table of the run's figures, then any extra markdown."""
    lines = [f"# {title}", "", "| figure | value |", "|---|---|"]
    for name, value in figures.items():
        shown = f"{value:.4g}" if isinstance(value, float) else value
        lines.append(f"| {name} | {shown} |")
    markdown = "\n".join(lines) + ("\n\n" + extra_markdown if extra_markdown else "")
    try:
        create_markdown_artifact(key=key, markdown=markdown, description=title)
    except Exception as err:  # an artifact is a report, never a reason to fail the run
        logging.getLogger(__name__).warning("could not create artifact %s: %s", key, err)
    logging.getLogger(__name__).info("%s: %s", title, json.dumps(figures, default=str))


def reuse_or_write(name: str, producer: str, make_rows: Callable[[], list[dict]]) -> DatasetRef:
    """The version of `name` that `producer` wrote before, or a new one from `make_rows()`:
    generated inputs (world tasks, world pairs) are written once per generator setting."""
    if name in list_datasets():
        for version in reversed(list_versions(name)):
            ref = read_dataset(name, version)
            if ref.meta.get("produced_by") == producer:
                return ref
    return write_dataset(name, make_rows(), produced_by=producer)
