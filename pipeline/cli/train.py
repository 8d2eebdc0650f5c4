"""`jam train`: the training stages, resumable; exit 75 after a preemption checkpoint."""

from __future__ import annotations

from typing import Annotated

import typer

from pipeline.cli.common import DEFAULT_PARAMS, ParamsOpt, SetOpt, fail, load

commands = typer.Typer()


@commands.command()
def train(
    stage_: Annotated[str, typer.Option("--stage", help="pretrain, finetune or all (pretrain then finetune).")] = "all",
    fresh: Annotated[bool, typer.Option("--fresh", help="Discard checkpoints and start new MLflow runs.")] = False,
    params: ParamsOpt = DEFAULT_PARAMS,
    set_: SetOpt = None,
) -> None:
    """Train the base and/or the style adapter. Re-running resumes from the last checkpoint.

    Exits 75 (EX_TEMPFAIL) when SIGTERM stopped it after a checkpoint: run the same command again to resume.
    """
    from pipeline.train.entry import stages_for, train_stages

    try:
        stages_for(stage_)
    except ValueError as err:
        fail(str(err), 2)
    cfg = load(params, set_)
    err = lambda m: typer.secho(m, fg=typer.colors.RED, err=True)  # noqa: E731
    raise typer.Exit(train_stages(cfg, stage_, fresh, typer.echo, err))
