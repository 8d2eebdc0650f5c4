"""What every command group shares: the params options, loading the config once, one-line failures."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer

from pipeline.core import constants as C
from pipeline.core.config import Config, ConfigError, load_config
from pipeline.core.profile import export_env

ParamsOpt = Annotated[Path, typer.Option("--params", "-p", help="Params file (YAML).")]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", "-s", help="Override a param: dotted.key=value (YAML value). Repeatable."),
]
DEFAULT_PARAMS = Path("params.yaml")


def load(params: Path, overrides: list[str] | None) -> Config:
    """The validated config, or a red message naming the key and exit 2."""
    for key, value in C.OFFLINE_ENV.items():
        os.environ.setdefault(key, value)
    # bitsandbytes looks for optional hub-fetched CPU kernels (the `kernels` package, which fetches at run time and
    # is deliberately not installed) and warns on every import; its built-in CPU path is what we use.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    try:
        cfg = load_config(params, overrides or [])
    except ConfigError as err:
        fail(str(err), 2)
    export_env(cfg.services)  # Prefect's API URL and the S3 endpoint, for this process and every child
    return cfg


def fail(message: str, code: int = 1) -> NoReturn:
    typer.secho(message, fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


def guarded(call: Callable[[], Any], errors: tuple[type[Exception], ...]) -> Any:
    """`call()`, turning the expected errors into their one-line message and exit 1."""
    try:
        return call()
    except errors as err:
        fail(str(err))


def echo_report(report: Any) -> None:
    """A stage report's summary line and its per-item failures."""
    typer.echo(report.summary())
    for item, why in report.failed.items():
        typer.secho(f"  failed {item}: {why}", fg=typer.colors.YELLOW, err=True)


def echo_promotion(result: Any) -> None:
    color = typer.colors.GREEN if result.changed else typer.colors.YELLOW
    typer.secho(result.message, fg=color)
    for reason in result.reasons:
        typer.echo(f"  {reason}")
