"""Commands over the stage graph: one stage, the whole flow, the resolved config, dvc.yaml."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from pipeline.cli.common import DEFAULT_PARAMS, ParamsOpt, SetOpt, echo_promotion, echo_report, fail, guarded, load
from pipeline.core import graph

commands = typer.Typer()


@commands.command()
def stage(
    name: Annotated[str, typer.Argument(help=f"Stage to run: {', '.join(graph.NAMES)}.")],
    fresh: Annotated[bool, typer.Option("--fresh", help="Training stages: discard checkpoints.")] = False,
    params: ParamsOpt = DEFAULT_PARAMS,
    set_: SetOpt = None,
) -> None:
    """Run one stage of the graph (what dvc.yaml calls). Incremental: unchanged items are not redone."""
    node = guarded(lambda: graph.stage(name), (graph.UnknownStage,))
    cfg = load(params, set_)
    if node.kind == "train":
        from pipeline.train.entry import train_stages

        err = lambda m: typer.secho(m, fg=typer.colors.RED, err=True)  # noqa: E731
        raise typer.Exit(train_stages(cfg, node.name, fresh, typer.echo, err))
    from pipeline.core.items import AllItemsFailed

    errors: tuple[type[Exception], ...] = (AllItemsFailed, FileNotFoundError)
    if node.kind == "model":
        from pipeline.evaluate.stage import EvaluateError
        from pipeline.registry.runs import RunsError

        errors += (EvaluateError, RunsError)
    result = guarded(lambda: graph.run_stage(node.name, cfg), errors)
    echo_promotion(result) if node.name == "promote" else echo_report(result)


@commands.command()
def run(
    params: ParamsOpt = DEFAULT_PARAMS,
    set_: SetOpt = None,
    dvc_commit: Annotated[bool, typer.Option(help="Record outputs in dvc.lock at the end.")] = True,
    until: Annotated[str | None, typer.Option(help=f"Stop after this stage: {', '.join(graph.NAMES)}.")] = None,
) -> None:
    """Run the whole Prefect flow over everything built so far."""
    if until is not None:
        guarded(lambda: graph.stage(until), (graph.UnknownStage,))
    cfg = load(params, set_)
    from pipeline.services import ServicesError, check_reachable

    guarded(lambda: check_reachable(cfg), (ServicesError,))  # the profile's services, before any work
    from flows.main import jam_flow

    try:
        summary = jam_flow(
            cfg=cfg, params_path=str(params), overrides=list(set_ or []), dvc_commit=dvc_commit, until=until
        )
    except Exception as err:  # the flow already logged the traceback; the user needs the one line
        fail(f"flow failed: {err}")
    typer.echo(summary)


@commands.command()
def pull(params: ParamsOpt = DEFAULT_PARAMS, set_: SetOpt = None) -> None:
    """Fetch from `services.dvc_remote` the stage outputs this machine lacks (what a fresh spot VM does first)."""
    cfg = load(params, set_)
    from pipeline import datasync

    if not datasync.enabled(cfg):
        fail(f"{params}: services.dvc_remote is not set", 2)
    guarded(lambda: datasync.configure(cfg), (datasync.DataSyncError,))
    stages = [node.name for node in graph.STAGES if node.dvc]
    pulled = guarded(lambda: datasync.pull(cfg, stages), (datasync.DataSyncError,))
    typer.echo(f"pulled: {', '.join(pulled)}" if pulled else "nothing to pull (all present, or the remote is empty)")


@commands.command("config")
def show_config(params: ParamsOpt = DEFAULT_PARAMS, set_: SetOpt = None) -> None:
    """Print the resolved, validated params as JSON."""
    cfg = load(params, set_)
    typer.echo(json.dumps(cfg.model_dump(mode="json"), indent=2))


@commands.command("dvc-yaml")
def dvc_yaml(
    check: Annotated[bool, typer.Option("--check", help="Exit 1 if dvc.yaml differs instead of writing it.")] = False,
    path: Annotated[Path, typer.Option(help="Where dvc.yaml lives.")] = Path("dvc.yaml"),
) -> None:
    """Write dvc.yaml from the stage graph (deps: every module each stage runs, its inputs, its params)."""
    text = graph.dvc_yaml()
    if check:
        if not path.exists() or path.read_text() != text:
            fail(f"{path} differs from the stage graph: run `jam dvc-yaml`")
        typer.echo(f"{path} matches the stage graph")
        return
    from pipeline.core.files import write_text

    write_text(path, text)
    typer.echo(f"wrote {path} ({len(graph.dvc_stages())} stages)")
