"""What every flow does around its work: record the run in the catalog, summarise it."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

import pyarrow as pa
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import flow_run

from flywheel.llm import BackendError, BackendSpec, ModelNotFound, model_fingerprint
from flywheel.store import (
    DatasetRef,
    DatasetVersionExists,
    ModelRef,
    list_datasets,
    list_model_versions,
    list_versions,
    read_dataset,
    read_model,
    record_run,
    write_dataset,
)
from flywheel.store.catalog import register_version


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


def write_once(
    name: str,
    rows: list[dict],
    version: str,
    produced_by: str,
    inputs: list,
    schema: pa.Schema | None = None,
) -> tuple[DatasetRef, bool]:
    """Write a planned version, or take the one an earlier (killed or repeated) run wrote.
    Returns (ref, reused)."""
    try:
        ref = write_dataset(
            name, rows, produced_by=produced_by, inputs=inputs, version=version, schema=schema
        )
        return ref, False
    except DatasetVersionExists:
        ref = read_dataset(name, version)
        register_version(ref)  # idempotent: heals a write whose registration failed
        return ref, True


def _retry_on_backend_error(task, task_run, state) -> bool:
    """Retry a model-calling task only for backend errors (a server that went away);
    its checkpoint makes the retry resume, not restart."""
    try:
        state.result()
    except ModelNotFound:
        return False
    except BackendError:
        return True
    except Exception:
        return False
    return False


# Options for tasks that call models.
MODEL_CALLS = dict(retries=2, retry_delay_seconds=10, retry_condition_fn=_retry_on_backend_error)


def model_inputs(spec: BackendSpec) -> list[ModelRef]:
    """The model behind a spec as a lineage input (its folder name and a fingerprint of
    its weights), or nothing when it is not a local folder (a server's model)."""
    folder = Path(spec.model).expanduser()
    if not folder.is_dir():
        return []
    fingerprint = model_fingerprint(BackendSpec(model=str(folder)))
    return [ModelRef(name=folder.name, version=f"fp_{fingerprint}", path=str(folder))]


def training_key(params_json: str, inputs: list, sources: str, base_model: str) -> str:
    """What a trained model depends on: parameters, input versions, the method's code and
    the base model's weights (retrained weights give a new key)."""
    parts = [
        params_json,
        *(f"{r.name}@{r.version}" for r in inputs),
        sources,
        model_fingerprint(BackendSpec(model=base_model)),
    ]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:24]


def earlier_model(name: str, key: str) -> ModelRef | None:
    """The latest version of `name` trained with the same `training_key`, if any."""
    for version in reversed(list_model_versions(name)):
        ref = read_model(name, version)
        if ref.meta.get("metrics", {}).get("cache_key") == key:
            return ref
    return None
