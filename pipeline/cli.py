"""`jam`: the one command line for the pipeline, training and the jam runner.

Heavy imports (torch, prefect, mlflow) happen inside commands, so `jam --help` and `jam play` start fast.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from pipeline.config import Config, ConfigError, load_config

app = typer.Typer(
    help="Turn recordings of one pianist into a real-time MIDI jam partner.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

ParamsOpt = Annotated[Path, typer.Option("--params", "-p", help="Params file (YAML).")]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", "-s", help="Override a param: dotted.key=value (YAML value). Repeatable."),
]

OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DVC_NO_ANALYTICS": "1",
    "TOKENIZERS_PARALLELISM": "false",
}


def _config(params: Path, overrides: list[str] | None) -> Config:
    for key, value in OFFLINE_ENV.items():
        os.environ.setdefault(key, value)
    try:
        return load_config(params, overrides or [])
    except ConfigError as err:
        typer.secho(str(err), fg=typer.colors.RED, err=True)
        raise typer.Exit(2) from None


def _stage_registry() -> dict[str, str]:
    """Stage name -> 'module:function'. Imported lazily: each stage pulls in its own heavy libraries."""
    return {
        "demo": "pipeline.demo:run_demo",
        "base": "pipeline.base_corpus:run_base",
        "acquire": "pipeline.acquire:run_acquire",
        "transcribe": "pipeline.transcribe:run_transcribe",
        "clean": "pipeline.clean:run_clean",
        "split": "pipeline.split:run_split",
        "augment": "pipeline.augment:run_augment",
        "tokenize": "pipeline.tokenize:run_tokenize",
    }


def resolve_stage(name: str):
    import importlib

    registry = _stage_registry()
    if name not in registry:
        raise typer.BadParameter(f"unknown stage {name!r}; one of: {', '.join(registry)}")
    module, func = registry[name].split(":")
    return getattr(importlib.import_module(module), func)


@app.command()
def stage(
    name: Annotated[
        str, typer.Argument(help="Stage to run: demo, base, acquire, transcribe, clean, split, augment, tokenize.")
    ],
    params: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
) -> None:
    """Run one stage (what dvc.yaml calls). Incremental: unchanged items are not redone."""
    cfg = _config(params, set_)
    from pipeline.files import AllItemsFailed

    try:
        report = resolve_stage(name)(cfg)
    except AllItemsFailed as err:
        typer.secho(str(err), fg=typer.colors.RED, err=True)
        raise typer.Exit(1) from None
    typer.echo(report.summary())
    for item, why in report.failed.items():
        typer.secho(f"  failed {item}: {why}", fg=typer.colors.YELLOW, err=True)


@app.command()
def run(
    params: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
    dvc_commit: Annotated[bool, typer.Option(help="Record outputs in dvc.lock at the end.")] = True,
) -> None:
    """Run the whole Prefect flow over everything built so far."""
    cfg = _config(params, set_)
    from flows.main import jam_flow

    try:
        summary = jam_flow(cfg=cfg, params_path=str(params), overrides=list(set_ or []), dvc_commit=dvc_commit)
    except Exception as err:  # the flow already logged the traceback; the user needs the one line
        typer.secho(f"flow failed: {err}", fg=typer.colors.RED, err=True)
        raise typer.Exit(1) from None
    typer.echo(summary)


@app.command("config")
def show_config(params: ParamsOpt = Path("params.yaml"), set_: SetOpt = None) -> None:
    """Print the resolved, validated params as JSON."""
    cfg = _config(params, set_)
    typer.echo(json.dumps(cfg.model_dump(mode="json"), indent=2))


@app.command()
def evaluate(
    run_id: Annotated[str | None, typer.Option("--run", help="Evaluate only this MLflow run id.")] = None,
    force: Annotated[bool, typer.Option(help="Re-evaluate runs already evaluated with these params.")] = False,
    params: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
) -> None:
    """Evaluate fine-tune runs (and their base) on the held-out test split; log metrics and samples to MLflow."""
    cfg = _config(params, set_)
    from pipeline.evaluate import EvaluateError, run_evaluate
    from pipeline.files import AllItemsFailed
    from pipeline.runs import RunsError

    try:
        report = run_evaluate(cfg, run_id=run_id, force=force)
    except (EvaluateError, RunsError, AllItemsFailed) as err:
        typer.secho(str(err), fg=typer.colors.RED, err=True)
        raise typer.Exit(1) from None
    typer.echo(report.summary())
    for item, why in report.failed.items():
        typer.secho(f"  failed {item}: {why}", fg=typer.colors.YELLOW, err=True)


@app.command()
def promote(
    rollback: Annotated[bool, typer.Option("--rollback", help="Swap the champion and previous versions.")] = False,
    params: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
) -> None:
    """Register the best gated fine-tune as the champion (or roll back to the previous one)."""
    cfg = _config(params, set_)
    from pipeline import promote as P
    from pipeline.runs import RunsError

    try:
        result = P.rollback(cfg) if rollback else P.run_promote(cfg)
    except RunsError as err:
        typer.secho(str(err), fg=typer.colors.RED, err=True)
        raise typer.Exit(1) from None
    color = typer.colors.GREEN if result.changed else typer.colors.YELLOW
    typer.secho(result.message, fg=color)
    for reason in result.reasons:
        typer.echo(f"  {reason}")
    if result.action == "refused":  # an explicit rollback that could not happen
        raise typer.Exit(1)


@app.command()
def runs(params: ParamsOpt = Path("params.yaml"), set_: SetOpt = None) -> None:
    """Table of the experiment's runs: role, key params, eval metrics, champion/previous."""
    cfg = _config(params, set_)
    from pipeline.runs import RunsError, runs_table

    try:
        typer.echo(runs_table(cfg))
    except RunsError as err:
        typer.secho(str(err), fg=typer.colors.RED, err=True)
        raise typer.Exit(1) from None


@app.command()
def ui(
    port: Annotated[int, typer.Option(help="Loopback port for the MLflow UI.")] = 5000,
    params: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
) -> None:
    """Start the MLflow UI on the project's store (127.0.0.1 only) until Ctrl-C."""
    cfg = _config(params, set_)
    import subprocess

    from pipeline.runs import ui_command

    cmd, url = ui_command(cfg, port)
    typer.echo(f"MLflow UI: {url}  (Ctrl-C to stop)")
    try:
        raise typer.Exit(subprocess.call(cmd))
    except KeyboardInterrupt:
        raise typer.Exit(0) from None


def main() -> None:  # pragma: no cover - console entry
    sys.exit(app())


if __name__ == "__main__":  # pragma: no cover
    main()
