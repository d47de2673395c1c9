"""The `flywheel` command."""

from __future__ import annotations

import logging
import time
from contextlib import AbstractContextManager
from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated, Any

import typer

app = typer.Typer(no_args_is_help=True, add_completion=False, help="Flywheel pipeline commands.")
server_app = typer.Typer(no_args_is_help=True, help="The local Prefect server (127.0.0.1).")
world_app = typer.Typer(no_args_is_help=True, help="The embedded verifiable world.")
store_app = typer.Typer(no_args_is_help=True, help="The data store itself.")
app.add_typer(server_app, name="server")
app.add_typer(world_app, name="world")
app.add_typer(store_app, name="store")


class OutputFormat(StrEnum):
    table = "table"
    csv = "csv"
    json = "json"


TABLE_ROWS = 200  # rows a table shows; csv and json print them all
TABLE_COLWIDTH = 40  # longer values are cut in a table


def _one_line(error: BaseException) -> str:
    """An error message on one line (DuckDB's LINE/caret context left out)."""
    text = str(error).split("\n\nLINE ")[0]
    return " ".join(line.strip() for line in text.splitlines() if line.strip())


def _fail(error: BaseException | str) -> None:
    typer.echo(error if isinstance(error, str) else _one_line(error), err=True)
    raise typer.Exit(1)


def _render(frame: Any) -> str:
    if frame.empty:  # pandas prints "Empty DataFrame" for no rows
        return " ".join(map(str, frame.columns))
    return frame.to_string(index=False, max_colwidth=TABLE_COLWIDTH)


def _text_width(text: str) -> int:
    return max(len(line) for line in text.splitlines())


def _table(frame: Any, width: int) -> str:
    """The frame as a text table no wider than ``width``: columns that do not fit are left
    out (named on a last line), rows after TABLE_ROWS too."""
    if frame.columns.empty:
        return ""
    head = frame.head(TABLE_ROWS)
    # Columns are laid out side by side, one space apart.
    shown, used = 0, -1
    for i in range(len(head.columns)):
        used += 1 + _text_width(_render(head.iloc[:, [i]]))
        if shown and used > width:
            break
        shown += 1
    text = _render(head.iloc[:, :shown])
    while shown > 1 and _text_width(text) > width:
        shown -= 1
        text = _render(head.iloc[:, :shown])
    lines = [text]
    if frame.empty:
        lines.append("(no rows)")
    if len(frame) > TABLE_ROWS:
        lines.append(f"... {len(frame) - TABLE_ROWS} more rows (use --format csv for all)")
    hidden = [str(c) for c in frame.columns[shown:]]
    if hidden:
        lines.append(f"... {len(hidden)} more columns: {', '.join(hidden)} (use --format csv)")
    return "\n".join(lines)


def _json_value(value: Any) -> Any:
    """A DataFrame cell as a JSON value: numpy, pandas and DuckDB types made plain."""
    import base64
    import math
    from datetime import date, time, timedelta
    from decimal import Decimal

    import numpy as np
    import pandas as pd

    if isinstance(value, dict):
        return {str(k): _json_value(v) for k, v in value.items()}
    if isinstance(value, list | tuple | np.ndarray):
        return [_json_value(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if value is None or value is pd.NaT or value is pd.NA:
        return None
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else str(value)
    if isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, timedelta):
        return pd.Timedelta(value).isoformat()
    if isinstance(value, date | time):
        return value.isoformat()
    if isinstance(value, Decimal):
        return float(value)
    if isinstance(value, bytes | bytearray | memoryview):
        return base64.b64encode(bytes(value)).decode("ascii")
    return str(value)


@app.command()
def sql(
    query: str,
    output: Annotated[
        OutputFormat,
        typer.Option(
            "--format",
            help="table (cut to the terminal width), csv, or json (one array of records)",
        ),
    ] = OutputFormat.table,
    csv: bool = typer.Option(False, "--csv", help="the same as --format csv"),
) -> None:
    """Run a read-only SQL query on the DuckDB catalog (every dataset is a view)."""
    import json
    import shutil

    import duckdb

    from flywheel.store import StoreError
    from flywheel.store import sql as run_sql

    if csv and output not in ("table", "csv"):
        _fail(f"--csv and --format {output} disagree: give one of them")
    try:
        frame = run_sql(query)
    except (duckdb.Error, StoreError, ValueError, OSError) as e:
        _fail(e)
    if csv or output == "csv":
        typer.echo(frame.to_csv(index=False), nl=False)
    elif output == "json":
        records = frame.to_dict(orient="records")
        typer.echo(json.dumps(_json_value(records), ensure_ascii=False, allow_nan=False))
    else:
        text = _table(frame, shutil.get_terminal_size().columns)
        if text:
            typer.echo(text)


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def shell(ctx: typer.Context) -> None:
    """Open the DuckDB CLI on the store's lake, attached read-only; flows keep writing.

    Arguments go on to duckdb, e.g. flywheel shell -c "select count(*) from runs".
    """
    import os
    import signal
    import subprocess
    import sys
    import tempfile
    from pathlib import Path

    import duckdb

    from flywheel.store import StoreError, lake, refresh_catalog

    cli = Path(sys.executable).parent / "duckdb"
    if not cli.exists():
        _fail(f"no DuckDB CLI at {cli}: install the duckdb-cli package into this environment")
    try:
        if not lake.exists():
            refresh_catalog()
        # what the setup statements return (CREATE SECRET's "Success") goes nowhere:
        # the shell's output is the user's queries' only
        statements = ";\n".join(lake.shell_statements())
        setup = f".output {os.devnull}\n{statements};\n.output\n"
        shown = lake.location().shown()
    except (duckdb.Error, StoreError, OSError) as e:
        _fail(e)
    typer.echo(
        f"flywheel shell: the lake {shown}, read-only; each query sees the versions "
        "written up to its start (`USE memory` for scratch tables)",
        err=True,
    )
    # The setup goes in a file only this user reads, not on the command line, which
    # other users see: with data in S3 it holds the credentials.
    with tempfile.TemporaryDirectory(prefix="flywheel-shell-") as folder:
        init = Path(folder) / "init.sql"
        init.touch(mode=0o600)
        init.write_text(setup)
        # Ctrl-C belongs to the shell (it stops a query there): this process and the
        # venv's duckdb wrapper ignore it, and the DuckDB CLI sets its own handler.
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            code = subprocess.call([str(cli), "-init", str(init), *ctx.args])
        finally:
            signal.signal(signal.SIGINT, previous)
    raise typer.Exit(code)


@app.command()
def datasets() -> None:
    """List datasets and their versions."""
    from flywheel.store import list_datasets, list_versions

    for name in list_datasets():
        versions = list_versions(name)
        typer.echo(f"{name}: {len(versions)} version(s), latest {versions[-1]}")


@store_app.command("migrate")
def store_migrate() -> None:
    """Move a store written before the lake (version folders and flywheel.duckdb) into the
    lake, keeping version names, rows and lineage; safe to run again."""
    import duckdb

    from flywheel.store import StoreError
    from flywheel.store.migrate import migrate

    try:
        report = migrate()
    except (duckdb.Error, StoreError, OSError) as e:
        _fail(e)
    for line in report.lines():
        typer.echo(line)
    if report.refused:
        raise typer.Exit(1)


def _names(values: list[str] | None) -> list[str]:
    """Repeated and comma-separated option values as one list."""
    return [n.strip() for v in values or [] for n in v.split(",") if n.strip()]


@app.command("import")
def import_(
    path: Annotated[str, typer.Argument(help="a .jsonl/.json/.csv/.parquet file or a folder")],
    name: Annotated[str, typer.Option("--name", help="the store dataset to write a version of")],
    file_format: Annotated[
        str | None,
        typer.Option("--format", help="jsonl, json (one array), csv, parquet or hf (a folder)"),
    ] = None,
    split: Annotated[str | None, typer.Option(help="the split of a saved DatasetDict")] = None,
    column_map: Annotated[
        list[str] | None, typer.Option("--map", help="SOURCE=TARGET: rename a column (repeat)")
    ] = None,
    require: Annotated[
        list[str] | None, typer.Option(help="columns that must exist after --map (a,b)")
    ] = None,
    text: Annotated[
        list[str] | None,
        typer.Option(help="columns that need non-empty text (repeat; default: string columns)"),
    ] = None,
    max_field_bytes: Annotated[int, typer.Option(min=1, help="largest value, in bytes")] = (
        1_000_000
    ),
    allow_bom: Annotated[bool, typer.Option(help="strip a UTF-8 byte-order mark")] = False,
    allow_crlf: Annotated[bool, typer.Option(help="accept CRLF line endings")] = False,
    drop_duplicates: Annotated[
        bool, typer.Option(help="keep only the first of identical rows")
    ] = False,
) -> None:
    """Check a file and import it as a new version of a store dataset (nothing is written
    unless every row passes)."""
    from flywheel.store import StoreError
    from flywheel.store.importing import import_file, parse_column_map

    try:
        report = import_file(
            path,
            name,
            format=file_format,
            split=split,
            column_map=parse_column_map(column_map or []),
            require=_names(require),
            text=_names(text) or None,
            max_field_bytes=max_field_bytes,
            allow_bom=allow_bom,
            allow_crlf=allow_crlf,
            drop_duplicates=drop_duplicates,
        )
    except (StoreError, ValueError, OSError) as e:
        _fail(f"error: {e}")
    typer.echo(report.summary())


@app.command()
def serve(
    detach: bool = typer.Option(False, help="run in the background (pid file under data/_run)"),
    stop: bool = typer.Option(False, help="stop a detached serve process"),
) -> None:
    """Register every deployment with its nightly schedule and run what comes due."""
    from flywheel.flows import services

    if stop:
        typer.echo("serve stopped" if services.stop("serve") else "serve was not running")
        return
    if detach:
        typer.echo(services.start_serve())
        return
    from flywheel.flows.deployments import serve_all

    serve_all()


@app.command()
def worker(
    pool: str = typer.Option(
        "flywheel", help="the Prefect work pool (process type; made if missing)"
    ),
    name: str | None = typer.Option(None, help="this worker's name in the UI (default: random)"),
    limit: int | None = typer.Option(None, min=1, help="flow runs at once (default: no limit)"),
) -> None:
    """Run deployments from a work pool: registers every deployment on the pool, then takes
    their runs (scheduled or by hand) until stopped. Start one per machine, from the
    project folder; use this or `flywheel serve`, not both."""
    from flywheel.flows.deployments import work_on_pool

    work_on_pool(pool, name, limit)


@server_app.command("start")
def server_start() -> None:
    """Start the Prefect server in the background (SQLite under data/_prefect)."""
    from flywheel.flows import services

    typer.echo(services.start_server())


@server_app.command("auth-string")
def server_auth_string() -> None:
    """Print the local server's auth string (the UI's login; PREFECT_API_AUTH_STRING)."""
    from flywheel.flows import services

    typer.echo(services.auth_string())


@server_app.command("stop")
def server_stop() -> None:
    from flywheel.flows import services

    typer.echo("server stopped" if services.stop("server") else "server was not running")


@app.command()
def status() -> None:
    """Whether the Prefect server and the serve process run; brings the catalog's `runs`
    in line with Prefect (killed runs recorded as crashed)."""
    from flywheel.flows import services

    healthy = services.server_healthy()
    typer.echo(services.status("server") + (", healthy" if healthy else ""))
    typer.echo(services.status("serve"))
    from flywheel.store import lake

    if not lake.exists():
        return
    from flywheel.flows.reconcile import reconcile_runs

    with _local_server():
        changed = reconcile_runs()
    for run_id, run_status in changed.items():
        typer.echo(f"run {run_id}: now recorded as {run_status} (as Prefect or its process says)")


def _local_server() -> AbstractContextManager:
    """Prefect settings that reach the local server with its auth string."""
    from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL, temporary_settings

    from flywheel.flows import services

    auth = {PREFECT_API_URL: services.API_URL, PREFECT_API_AUTH_STRING: services.auth_string()}
    return temporary_settings(updates=auth)


@app.command()
def up(wait_s: float = typer.Option(60, help="seconds to wait for the deployments")) -> None:
    """Start the server and the serve process, and wait until the deployments exist."""
    from flywheel.flows import services

    try:
        typer.echo(services.start_server())
    except RuntimeError as e:
        typer.echo(str(e), err=True)
        raise typer.Exit(1) from e
    # a serve process started now re-registers every deployment with today's parameter
    # schemas; until it has, the server still holds the ones an earlier process registered
    fresh_since = None if services.running("serve") else datetime.now(UTC)
    typer.echo(services.start_serve())
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        if _deployments_registered(fresh_since):
            typer.echo("deployments registered: " + ", ".join(_deployment_names()))
            typer.echo(
                f"the server needs its auth string (UI login, API clients): see "
                f"`flywheel server auth-string`; the prefect CLI run from the project root "
                f"reads it from {services.profiles_file()}"
            )
            return
        time.sleep(1)
    typer.echo(f"deployments did not appear in {wait_s:.0f}s; see data/_run/serve.log", err=True)
    raise typer.Exit(1)


@app.command()
def down() -> None:
    """Stop the serve process and the Prefect server."""
    from flywheel.flows import services

    for name in ("serve", "server"):
        typer.echo(f"{name} stopped" if services.stop(name) else f"{name} was not running")


def _deployment_names() -> list[str]:
    from flywheel.flows.deployments import NIGHTLY_UTC

    return list(NIGHTLY_UTC)


def _deployments_registered(since: datetime | None = None) -> bool:
    """Whether every deployment exists and, with `since`, was registered (created or
    updated) at `since` or later."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    with _local_server(), get_client(sync_client=True) as client:
        try:
            for name in _deployment_names():
                deployment = client.read_deployment_by_name(name)
                if since is not None and (deployment.updated is None or deployment.updated < since):
                    return False
        except ObjectNotFound:
            return False
    return True


@world_app.command("bootstrap")
def world_bootstrap(
    small_steps: int | None = typer.Option(None, help="default: BootstrapConfig's"),
    large_steps: int | None = typer.Option(None, help="default: BootstrapConfig's"),
    force: bool = typer.Option(False, help="retrain even when models with this config exist"),
) -> None:
    """Train the world's tiny models without Prefect (the `world/bootstrap` flow does the same)."""
    from flywheel.llm.threads import set_torch_threads
    from flywheel.world.bootstrap import (
        BelowAccuracyFloor,
        BootstrapConfig,
        bootstrap_models,
        format_report,
        models_root,
    )

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    set_torch_threads()
    overrides = {"small_steps": small_steps, "large_steps": large_steps}
    config = BootstrapConfig(force=force, **{k: v for k, v in overrides.items() if v is not None})
    try:
        report = bootstrap_models(models_root(), config)
    except BelowAccuracyFloor as e:
        typer.echo(str(e), err=True)
        raise typer.Exit(1) from e
    typer.echo(format_report(report))


@world_app.command("report")
def world_report() -> None:
    """Accuracy per family of the published world models (and the shop agent's success)."""
    from flywheel.world.bootstrap import format_report, models_root, read_report

    report = read_report(models_root())
    if not report["models"]:
        typer.echo(f"no world models under {models_root()}; run `flywheel world bootstrap`")
        raise typer.Exit(1)
    typer.echo(format_report(report))


def main() -> None:
    app()
