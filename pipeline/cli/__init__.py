"""`jam`: the one command line. It only composes the per-phase command groups below.

Heavy imports (torch, prefect, mlflow) happen inside commands, so `jam --help` and `jam play` start fast.
"""

from __future__ import annotations

import typer

from pipeline.cli import data, jam, registry, services, train

app = typer.Typer(
    help="Turn recordings of one pianist into a real-time MIDI jam partner.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
for group in (data.commands, train.commands, registry.commands, services.commands, jam.commands):
    app.registered_commands.extend(group.registered_commands)
    app.registered_groups.extend(group.registered_groups)


def main() -> None:  # pragma: no cover - console entry
    app()
