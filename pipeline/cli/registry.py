"""Commands over the MLflow store: evaluate runs, promote the best, compare runs, open the UI."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from pipeline.cli.common import DEFAULT_PARAMS, ParamsOpt, SetOpt, echo_promotion, echo_report, guarded, load

commands = typer.Typer()


@commands.command()
def evaluate(
    run_id: Annotated[str | None, typer.Option("--run", help="Evaluate only this MLflow run id.")] = None,
    force: Annotated[bool, typer.Option(help="Re-evaluate runs already evaluated with these params.")] = False,
    blend: Annotated[
        str | None,
        typer.Option(help="A,B: attribution to style A of blends {A: w, B: 1-w} of --model, w = 0 .. 1 (no MLflow)."),
    ] = None,
    model: Annotated[Path, typer.Option(help="Bundle for --blend.")] = Path("data/finetune/bundle"),
    check: Annotated[bool, typer.Option(help="--blend: exit 1 unless attribution rises with the weight.")] = False,
    params: ParamsOpt = DEFAULT_PARAMS,
    set_: SetOpt = None,
) -> None:
    """Evaluate fine-tune runs (and their base) on the held-out test split; log metrics and samples to MLflow."""
    cfg = load(params, set_)
    from pipeline.core.graph import run_stage
    from pipeline.core.items import AllItemsFailed
    from pipeline.evaluate.testset import EvaluateError
    from pipeline.registry.runs import RunsError
    from realtime.bundle_format import BundleError

    if blend:
        from pipeline.evaluate.blend import blend_problem

        a, b, rows = guarded(lambda: _blend(cfg, blend, model), (EvaluateError, BundleError))
        echo_blend(a, b, rows)
        problem = blend_problem(rows)
        if check and problem:
            typer.echo(f"error: blending {a} and {b}: {problem}", err=True)
            raise typer.Exit(1)
        return
    call = lambda: run_stage("evaluate", cfg, run_id=run_id, force=force)  # noqa: E731
    echo_report(guarded(call, (EvaluateError, RunsError, AllItemsFailed)))


def _blend(cfg, spec: str, bundle: Path) -> tuple[str, str, list[dict]]:
    from pipeline.core.graph import io
    from pipeline.evaluate.blend import blend_curve
    from pipeline.evaluate.testset import EvaluateError, load_eval_data

    a, sep, b = spec.partition(",")
    if not sep or not a or not b or a == b:
        raise EvaluateError(f"--blend wants two different styles A,B; got {spec!r}")
    inputs, out_dir = io(cfg, "evaluate")
    return a, b, blend_curve(bundle, a, b, load_eval_data(cfg, inputs), cfg, out_dir / "blend")


def echo_blend(a: str, b: str, rows: list[dict]) -> None:
    typer.echo(f"weight on {a} (rest on {b})  ->  share attributed to {a} [95 % CI]")
    for row in rows:
        typer.echo(f"  {row['weight']:.2f}  ->  {row['share']:.2f} [{row['ci_low']:.2f}, {row['ci_high']:.2f}]")


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
