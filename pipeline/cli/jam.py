"""The jam runner's commands: play, the latency bench, and tools to make and inspect sessions.

`jam play`'s options are generated from `realtime.settings.RealtimeSettings`, one per field with the field's name
(`--silence-gap-s`), so they match params.yaml's `realtime:` keys and `python -m realtime`'s flags.
"""

from __future__ import annotations

import enum
import inspect
import json
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer

from pipeline.cli.common import DEFAULT_PARAMS, ParamsOpt, SetOpt, fail, load
from pipeline.core.config import Config
from realtime.settings import JamSettings, flags, parse_adapters

commands = typer.Typer()


def _realtime_settings(cfg: Config, **changes) -> JamSettings:
    """`cfg.realtime` plus the registry and MLflow store from `cfg.project`, as the runner's settings."""
    values = {**dict(cfg.realtime), "registry_name": cfg.project.name, "tracking_uri": cfg.project.mlflow_uri}
    try:
        return JamSettings.build({**values, **changes})
    except ValueError as err:
        fail(str(err), 2)


def _realtime_overrides(options: dict) -> list[str]:
    """Options given (not None) as `realtime.<key>=<json>` overrides, validated with params.yaml."""
    plain = {Path: str, enum.Enum: lambda v: v.value}
    given = {key: next((f(v) for t, f in plain.items() if isinstance(v, t)), v) for key, v in options.items()}
    given = {key: v for key, v in given.items() if v is not None}
    return [f"realtime.{key}={json.dumps(v)}" for key, v in given.items()]


def _settings_options() -> list[inspect.Parameter]:
    """One Typer option per `RealtimeSettings` field; None (not given) leaves params.yaml's value."""
    out = []
    for flag in flags():
        decls = list(flag.flags)
        if flag.kind is bool:
            decls[0] = f"{decls[0]}/--no-{decls[0][2:]}"
        kind = list[str] if flag.repeat else flag.kind
        if flag.choices:  # Typer offers choices for Enums (not Literals); StrEnum values dump to JSON as str
            kind = enum.StrEnum(flag.name, {choice: choice for choice in flag.choices})
        option = typer.Option(None, *decls, help=f"{flag.help} (realtime.{flag.name})")
        out.append(inspect.Parameter(flag.name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=kind | None))
    return out


def _with_settings_options(func: Callable) -> Callable:
    """Give `func(**given, <its own keyword parameters>)` a signature Typer reads: the settings options first."""
    own = list(inspect.signature(func, eval_str=True).parameters.values())
    own = [p for p in own if p.kind is inspect.Parameter.KEYWORD_ONLY]
    func.__signature__ = inspect.Signature([*_settings_options(), *own])
    func.__annotations__ = {p.name: p.annotation for p in func.__signature__.parameters.values()}
    return func


@commands.command()
@_with_settings_options
def play(
    *,
    no_record: Annotated[bool, typer.Option("--no-record", help="Do not record the session.")] = False,
    params: ParamsOpt = DEFAULT_PARAMS,
    set_: SetOpt = None,
    **given,
) -> None:
    """Jam live: listen on MIDI (or a file played as the human), answer in the model's style, print latency at exit.

    Every option is also a key in params.yaml under `realtime:` (shown after each); options override it for one
    session. `--input-file` implies `--transport file`.
    """
    try:
        given["adapters"] = parse_adapters(given.get("adapters"))
    except ValueError as err:
        fail(str(err), 2)
    if given.get("input_file") is not None:
        given["transport"] = given.get("transport") or "file"
    cfg = load(params, [*(set_ or []), *_realtime_overrides(given)])
    settings = _realtime_settings(cfg, **({"record": None} if no_record else {}))
    from realtime.bundle import BundleError
    from realtime.runner import run_jam
    from realtime.transport import TransportError

    try:
        summary = run_jam(settings)
    except (BundleError, TransportError) as err:
        fail(str(err))
    typer.echo(json.dumps(summary))


bench_app = typer.Typer(help="Speed measurements that print JSON.", no_args_is_help=True)
commands.add_typer(bench_app, name="bench")


def _size_opt(help_: str) -> typer.models.OptionInfo:
    return typer.Option(help=f"Random model (no --model): {help_}.", rich_help_panel="Random model")


@bench_app.command("latency")
def bench_latency(
    model: Annotated[
        str | None,
        typer.Option(
            "--model",
            "-m",
            help="Bundle folder, models:/<name>@<alias>, or 'random'. Default: the registry's champion if there is "
            "one, else a random-weight bundle of the size below (the music is noise; the cost is real).",
        ),
    ] = None,
    mode: Annotated[str | None, typer.Option(help="call_response or continuous. Default: realtime.mode.")] = None,
    input_file: Annotated[
        Path | None,
        typer.Option(
            "--input",
            "-i",
            exists=True,
            dir_okay=False,
            help="A MIDI performance as the human (default: simulated 8-note phrases).",
        ),
    ] = None,
    rounds: Annotated[int, typer.Option(help="Simulated phrases (after one warm-up round).")] = 20,
    hidden: Annotated[int, _size_opt("hidden size")] = 192,
    layers: Annotated[int, _size_opt("decoder layers")] = 4,
    heads: Annotated[int, _size_opt("attention heads")] = 6,
    kv_heads: Annotated[int | None, _size_opt("key/value heads (grouped-query attention; default: heads)")] = None,
    vocab: Annotated[int, _size_opt("BPE vocabulary size")] = 1024,
    max_seq_len: Annotated[int, _size_opt("context length in tokens")] = 256,
    e2e: Annotated[
        bool, typer.Option("--e2e", help="Also a real-time session with a MIDI file as the human (about 3 s a round).")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print only the JSON result, on one line.")] = False,
    params: ParamsOpt = DEFAULT_PARAMS,
    set_: SetOpt = None,
) -> None:
    """Latency p50/p95/p99, ms per generated id and real-time factor, headless (no MIDI ports).

    With --input the human is that performance (engine level on a virtual timeline; --e2e: a real-time session).
    """
    cfg = load(params, [*(set_ or []), *_realtime_overrides({"mode": mode})])
    size = {"hidden": hidden, "layers": layers, "heads": heads, "kv_heads": kv_heads, "vocab": vocab,
            "max_seq_len": max_seq_len}  # fmt: skip
    from realtime.benchmark import run_benchmark
    from realtime.bundle import BundleError

    settings = _realtime_settings(cfg, transport="memory", record=None, input_file=input_file)
    try:
        model = _champion_or_random(settings) if model is None else None if model == "random" else model
        result = run_benchmark(settings, model=model, size=size, rounds=rounds, e2e=e2e)
    except BundleError as err:
        fail(str(err))
    if not as_json:
        r = result
        line = f"p50 {r['p50_ms']} ms  p95 {r['p95_ms']} ms  p99 {r['p99_ms']} ms  {r['ms_per_token']} ms/id"
        typer.echo(f"{line}  RTF {r['rtf']}  load {r['load_s']} s  [{r['backend']}]", err=True)
    typer.echo(json.dumps(result, indent=None if as_json else 2))


def _champion_or_random(settings: JamSettings) -> str | None:
    """The champion's URI when the registry has one (resolving it caches the copy), else None (a random model)."""
    from realtime.bundle import BundleError, resolve_bundle

    try:
        resolve_bundle(settings.model_ref, settings.tracking_uri)
    except BundleError:
        return None
    return settings.model_ref


@commands.command()
def phrases(
    src: Annotated[Path, typer.Argument(help="A MIDI file, e.g. a held-out piece of the player.")],
    dest: Annotated[Path, typer.Argument(help="Where to write the phrased file.")],
    bars: Annotated[float, typer.Option(help="Bars per phrase.")] = 2.0,
    rest_bars: Annotated[float, typer.Option(help="Bars of silence after each phrase (the partner's turn).")] = 2.0,
    count: Annotated[int, typer.Option(help="Number of phrases.")] = 4,
) -> None:
    """Cut a piece into phrases with rests between them: a simulated human for call-and-response."""
    from pipeline.core.midi import MidiError
    from pipeline.data.demo import phrase_file

    try:
        n = phrase_file(src, dest, bars, rest_bars, count)
    except MidiError as err:
        typer.secho(str(err), fg=typer.colors.RED, err=True)
        raise typer.Exit(1) from None
    typer.echo(f"{dest}: {count} phrases of {bars:g} bars, {n} notes, {rest_bars:g} bars of rest after each")


@commands.command()
def show(
    session: Annotated[Path, typer.Argument(help="A MIDI file, e.g. a session recorded by `jam play`.")],
    png: Annotated[Path | None, typer.Option(help="Piano roll to write (default: beside the MIDI file).")] = None,
) -> None:
    """Summarise a recorded session per track and draw its piano roll (human and model overlaid)."""
    from pipeline.evaluate.session import SessionReadError, summarise_session

    try:
        lines, out = summarise_session(session, png)
    except SessionReadError as err:
        fail(str(err))
    for line in lines:
        typer.echo(line)
    typer.echo(f"piano roll: {out}")
