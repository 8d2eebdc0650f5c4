"""Commands over the MLflow store: evaluate runs, promote the best, compare runs, open the UI."""

from __future__ import annotations

from typing import Annotated

import typer

from pipeline.cli.common import DEFAULT_PARAMS, ParamsOpt, SetOpt, echo_promotion, echo_report, guarded, load

commands = typer.Typer()


@commands.command()
def evaluate(
    run_id: Annotated[str | None, typer.Option("--run", help="Evaluate only this MLflow run id.")] = None,
    force: Annotated[bool, typer.Option(help="Re-evaluate runs already evaluated with these params.")] = False,
    params: ParamsOpt = DEFAULT_PARAMS,
    set_: SetOpt = None,
) -> None:
    """Evaluate fine-tune runs (and their base) on the held-out test split; log metrics and samples to MLflow."""
    cfg = load(params, set_)
    from pipeline.core.graph import run_stage
    from pipeline.core.items import AllItemsFailed
    from pipeline.evaluate.stage import EvaluateError
    from pipeline.registry.runs import RunsError

    call = lambda: run_stage("evaluate", cfg, run_id=run_id, force=force)  # noqa: E731
    echo_report(guarded(call, (EvaluateError, RunsError, AllItemsFailed)))


@commands.command()
def promote(
    rollback: Annotated[bool, typer.Option("--rollback", help="Swap the champion and previous versions.")] = False,
    params: ParamsOpt = DEFAULT_PARAMS,
    set_: SetOpt = None,
) -> None:
    """Register the best gated fine-tune as the champion (or roll back to the previous one)."""
    cfg = load(params, set_)
    from pipeline.core.graph import run_stage
    from pipeline.registry import promote as P
    from pipeline.registry.runs import RunsError

    result = guarded(lambda: P.rollback(cfg) if rollback else run_stage("promote", cfg), (RunsError,))
    echo_promotion(result)
    if result.action == "refused":  # an explicit rollback that could not happen
        raise typer.Exit(1)


@commands.command()
def runs(params: ParamsOpt = DEFAULT_PARAMS, set_: SetOpt = None) -> None:
    """Table of the experiment's runs: role, key params, eval metrics, champion/previous."""
    cfg = load(params, set_)
    from pipeline.registry.runs import RunsError, runs_table

    typer.echo(guarded(lambda: runs_table(cfg), (RunsError,)))


@commands.command()
def ui(
    port: Annotated[int, typer.Option(help="Loopback port for the MLflow UI.")] = 5000,
    params: ParamsOpt = DEFAULT_PARAMS,
    set_: SetOpt = None,
) -> None:
    """Start the MLflow UI on the project's store (127.0.0.1 only) until Ctrl-C."""
    cfg = load(params, set_)
    from pipeline.registry.runs import serve, ui_command

    cmd, url = ui_command(cfg, port)
    typer.echo(f"MLflow UI: {url}  (Ctrl-C to stop)")
    raise typer.Exit(serve(cmd))
