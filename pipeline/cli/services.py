"""`jam services up|down|status` (the spot profile's servers on loopback), `jam deploy`, `jam recover`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from pipeline.cli.common import DEFAULT_PARAMS, ParamsOpt, SetOpt, fail, load

commands = typer.Typer()
services_app = typer.Typer(
    help="The shared services of the spot profile (moto S3, MLflow, Prefect) on 127.0.0.1.", no_args_is_help=True
)
commands.add_typer(services_app, name="services")

StateOpt = Annotated[Path | None, typer.Option("--state-dir", help="Default: services.state_dir.")]


@services_app.command("up")
def services_up(params: ParamsOpt = DEFAULT_PARAMS, set_: SetOpt = None, state_dir: StateOpt = None) -> None:
    """Start the servers the profile names, wait until each answers, create its buckets (e.g. -p params-spot.yaml)."""
    cfg = load(params, set_)
    from pipeline.services import ServicesError, up

    try:
        state = up(cfg, state_dir)
    except ServicesError as err:
        fail(str(err))
    for name, entry in state["services"].items():
        typer.echo(f"{name:8s} {entry['url']}  (pid {entry['pid']}, log {entry['log']})")
    typer.echo(f"buckets: {', '.join(state['buckets']) or '-'}")


@services_app.command("down")
def services_down(params: ParamsOpt = DEFAULT_PARAMS, set_: SetOpt = None, state_dir: StateOpt = None) -> None:
    """Stop exactly the servers `jam services up` started (by the pids in its state file)."""
    cfg = load(params, set_)
    from pipeline.services import down

    stopped = down(state_dir or cfg.services.state_dir)
    typer.echo(f"stopped: {', '.join(stopped)}" if stopped else "nothing was running")


@services_app.command("status")
def services_status(
    params: ParamsOpt = DEFAULT_PARAMS,
    set_: SetOpt = None,
    state_dir: StateOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON list.")] = False,
) -> None:
    """Each recorded server: alive (its process) and healthy (answers). Exit 1 if any is not."""
    cfg = load(params, set_)
    from pipeline.services import status

    rows = status(state_dir or cfg.services.state_dir)
    if as_json:
        typer.echo(json.dumps(rows))
    for row in [] if as_json else rows:
        state = "healthy" if row["healthy"] else ("alive, not answering" if row["alive"] else "stopped")
        typer.echo(f"{row['name']:8s} {row['url']}  {state}")
    if not rows or not all(r["healthy"] for r in rows):
        raise typer.Exit(1)


@commands.command()
def deploy(
    params: ParamsOpt = Path("params-spot.yaml"),
    set_: SetOpt = None,
    until: Annotated[str | None, typer.Option(help="The deployment's default last stage (default: all).")] = None,
) -> None:
    """Register the pipeline on the profile's Prefect process work pool, with automations that re-run crashed runs.

    Then on any machine with a checkout: `JAM_HOME=$PWD prefect worker start --pool <services.work_pool>`, and
    `prefect deployment run jam-pipeline/<services.deployment>` (or the UI) runs the whole pipeline on a worker.
    """
    cfg = load(params, set_)
    from pipeline.services import ServicesError, check_reachable

    if not cfg.services.prefect_api_url:
        fail(f"{params}: services.prefect_api_url is not set (a deployment lives on a Prefect server)", 2)
    try:
        check_reachable(cfg)
    except ServicesError as err:
        fail(str(err))
    from flows.deploy import HOME_ENV, deploy

    result = deploy(cfg, str(params), until)
    typer.echo(f"deployment {result['deployment']} on work pool {result['pool']} ({result['deployment_id']})")
    for name in result["automations"]:
        typer.echo(f"automation: {name}")
    typer.echo(f"start a worker: {HOME_ENV}=$PWD prefect worker start --pool {result['pool']}")
    typer.echo(f"run it: prefect deployment run {result['deployment']}")
