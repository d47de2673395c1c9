"""What every flow does around its work: record the run in the catalog, summarise it."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import inspect
import json
import logging
import os
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import prefect
from prefect import Flow
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import flow_run
from pydantic import BaseModel

from flywheel.flows.reconcile import reconcile_runs
from flywheel.llm import BackendError, BackendSpec, ModelNotFound, model_fingerprint
from flywheel.llm.threads import set_torch_threads
from flywheel.llm.usage import calls_markdown, counting_calls, current_calls
from flywheel.store import (
    ModelRef,
    list_model_versions,
    read_model,
    record_run,
)


def current_run_id() -> str:
    """The Prefect flow run id, or a local id when called outside a flow run."""
    return str(flow_run.id or f"local-{datetime.now(UTC):%Y%m%d%H%M%S%f}")


@contextlib.contextmanager
def tracked_run(flow: str, parameters: dict) -> Iterator[str]:
    """Record the run in the catalog's `runs` table as running, then completed or failed.

    Also what every run does first: torch's thread count set on purpose
    (`flywheel.llm.threads`), and the effective parameters, defaults included, shown
    on the run as an artifact. Rows of earlier runs left `running` by a killed process
    are brought up to date first (`reconcile_runs`); the row of this one records its
    pid and host for that, and at the end what its backends sent (`model_calls`)."""
    set_torch_threads()
    run_id = current_run_id()
    _parameters_artifact(flow, parameters)
    try:  # cheap: only rows still `running`
        reconcile_runs(recent=None)
    except Exception as err:  # bookkeeping of other runs, never a reason to fail this one
        logging.getLogger(__name__).debug("runs not reconciled: %s", err)
    started, pid, host = datetime.now(UTC), os.getpid(), socket.gethostname()
    record_run(run_id, flow, parameters, "running", started=started, pid=pid, host=host)
    with counting_calls() as calls:
        status = "failed"  # unless the body returns
        try:
            yield run_id
            status = "completed"
        finally:
            ended = datetime.now(UTC)
            record_run(run_id, flow, parameters, status, ended=ended, model_calls=calls.totals())


def _parameters_artifact(flow: str, parameters: dict) -> None:
    if flow_run.id is None:
        return  # outside a flow run (a notebook): nothing to attach it to
    markdown = "```json\n" + json.dumps(parameters, indent=2, default=str) + "\n```"
    key = flow.replace("/", "-") + "-parameters"
    try:
        create_markdown_artifact(key=key, markdown=markdown, description="effective parameters")
    except Exception as err:  # a report, never a reason to fail the run
        logging.getLogger(__name__).warning("could not create artifact %s: %s", key, err)


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


def length_figures(length: dict[str, dict]) -> dict[str, int | str]:
    """Summary figures of what was cut or left out for length, per split (`train`,
    `eval`, a group...): a method's LengthReport dicts, as `flywheel.llm.tokens` counts."""
    figures: dict[str, int | str] = {}
    for split, report in length.items():
        if not report:  # a model saved before lengths were counted
            continue
        figures[f"{split} texts truncated to max_length {report['max_length']}"] = report[
            "truncated"
        ]
        unit = "pairs" if "pairs_dropped" in report else "texts"
        dropped = report.get("pairs_dropped", report["dropped"])
        figures[f"{split} {unit} dropped for length"] = dropped
        figures[f"{split} longest text (tokens)"] = report["longest"]
    return figures


@dataclass
class FlowRun:
    """What a flow run is to its body: its id, and the summary it ends with."""

    name: str  # the deployment, e.g. "decode/hybrid"
    title: str
    id: str
    started: float

    def summary(self, figures: dict, extra_markdown: str = "") -> dict:
        """The run's summary artifact (`<group>-<name>`): its figures, the seconds it took,
        any extra markdown, then the model calls so far. Returns the figures."""
        figures["seconds"] = round(time.monotonic() - self.started, 2)
        calls = current_calls()
        tables = [extra_markdown, calls_markdown(calls.totals() if calls else [])]
        markdown = "\n\n".join(t for t in tables if t)
        summary_artifact(self.name.replace("/", "-"), self.title, figures, markdown)
        return figures


@dataclass
class Deployment:
    """A deployment, declared once: its `<flow>/<name>` (what `prefect deployment run`
    takes), the title of its summary and its parameter model. Its nightly time is in
    `flows/deployments.py`, where the whole night reads in order.

    `@DEPLOYMENT.flow` (or `@DEPLOYMENT.flow(check=check_inputs)`) makes a function
    `fn(params, run)` (or `fn(params, inputs, run)`) its Prefect flow. Prefect sees one
    parameter, `params`, with the model's defaults: what the UI shows and pre-fills. The
    flow records the run in the catalog (`tracked_run`, with the effective parameters),
    runs `check(params)` first when given and passes its result on, and times the run
    for `run.summary(...)`. The docstring's first line is the deployment's description,
    and each flow run is named after the deployment."""

    name: str
    title: str
    parameters: type[BaseModel]
    defaults: BaseModel = field(init=False)
    entry: Flow | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        self.defaults = self.parameters()

    def flow(self, fn: Callable | None = None, *, check: Callable | None = None) -> Any:
        if fn is None:
            return lambda fn: self.flow(fn, check=check)
        names = list(inspect.signature(fn).parameters)
        takes = ["params", "<inputs>", "run"] if check else ["params", "run"]
        if len(names) != len(takes) or (names[0], names[-1]) != ("params", "run"):
            raise TypeError(
                f"{self.name}: the flow {fn.__name__} takes ({', '.join(takes)}), "
                f"got ({', '.join(names)})"
            )

        @functools.wraps(fn)
        def entry(params: BaseModel = self.defaults) -> Any:
            with self.run(params) as run:
                return fn(params, check(params), run) if check else fn(params, run)

        # what Prefect reads for the parameter schema, validation and the call
        entry.__signature__ = inspect.Signature(
            [
                inspect.Parameter(
                    "params", _BY_NAME, default=self.defaults, annotation=self.parameters
                )
            ]
        )
        entry.__annotations__ = {"params": self.parameters}
        self.entry = prefect.flow(
            name=self.name.split("/", 1)[0], flow_run_name=self._flow_run_name
        )(entry)
        return self.entry

    def _flow_run_name(self) -> str:
        # the UI's run list then says which deployment ran, though flows share a name
        return f"{self.name} {datetime.now(UTC):%Y-%m-%d %H:%M}"

    @contextlib.contextmanager
    def run(self, params: BaseModel) -> Iterator[FlowRun]:
        started = time.monotonic()
        with tracked_run(self.name, params.model_dump(mode="json")) as run_id:
            yield FlowRun(self.name, self.title, run_id, started)


_BY_NAME = inspect.Parameter.POSITIONAL_OR_KEYWORD
