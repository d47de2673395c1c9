"""The `flywheel` command."""

from __future__ import annotations

import logging
import time

import typer

app = typer.Typer(no_args_is_help=True, add_completion=False, help="Flywheel pipeline commands.")
server_app = typer.Typer(no_args_is_help=True, help="The local Prefect server (127.0.0.1).")
world_app = typer.Typer(no_args_is_help=True, help="The embedded verifiable world.")
app.add_typer(server_app, name="server")
app.add_typer(world_app, name="world")


@app.command()
def sql(query: str, csv: bool = typer.Option(False, help="print CSV instead of a table")) -> None:
    """Run a SQL query on the DuckDB catalog (every dataset is a view)."""
    import pandas as pd

    from flywheel.store import sql as run_sql

    frame = run_sql(query)
    if csv:
        typer.echo(frame.to_csv(index=False), nl=False)
    else:
        with pd.option_context("display.max_rows", 200, "display.width", 200):
            typer.echo(frame.to_string(index=False))


@app.command()
def datasets() -> None:
    """List datasets and their versions."""
    from flywheel.store import list_datasets, list_versions

    for name in list_datasets():
        versions = list_versions(name)
        typer.echo(f"{name}: {len(versions)} version(s), latest {versions[-1]}")


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


@server_app.command("start")
def server_start() -> None:
    """Start the Prefect server in the background (SQLite under data/_prefect)."""
    from flywheel.flows import services

    typer.echo(services.start_server())


@server_app.command("stop")
def server_stop() -> None:
    from flywheel.flows import services

    typer.echo("server stopped" if services.stop("server") else "server was not running")


@app.command()
def status() -> None:
    """Whether the Prefect server and the serve process run."""
    from flywheel.flows import services

    typer.echo(services.status("server") + ("" if not services.server_healthy() else ", healthy"))
    typer.echo(services.status("serve"))


@app.command()
def up(wait_s: float = typer.Option(60, help="seconds to wait for the deployments")) -> None:
    """Start the server and the serve process, and wait until the deployments exist."""
    from flywheel.flows import services

    typer.echo(services.start_server())
    typer.echo(services.start_serve())
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        if _deployments_registered():
            typer.echo("deployments registered: " + ", ".join(_deployment_names()))
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


def _deployments_registered() -> bool:
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            for name in _deployment_names():
                client.read_deployment_by_name(name)
        except ObjectNotFound:
            return False
    return True


@world_app.command("bootstrap")
def world_bootstrap(
    small_steps: int | None = typer.Option(None, help="default: BootstrapConfig's"),
    large_steps: int | None = typer.Option(None, help="default: BootstrapConfig's"),
) -> None:
    """Train the world's tiny models without Prefect (the `world/bootstrap` flow does the same)."""
    from flywheel.world.bootstrap import (
        BootstrapConfig,
        bootstrap_models,
        format_report,
        models_root,
    )

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    overrides = {"small_steps": small_steps, "large_steps": large_steps}
    config = BootstrapConfig(**{k: v for k, v in overrides.items() if v is not None})
    report = bootstrap_models(models_root(), config)
    typer.echo(format_report(report))


def main() -> None:
    app()
