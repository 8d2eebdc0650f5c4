"""The jam runner's commands: play, the latency bench, and tools to make and inspect sessions."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from pipeline.cli.common import DEFAULT_PARAMS, ParamsOpt, SetOpt, load
from pipeline.core.config import Config

commands = typer.Typer()


def _realtime_settings(cfg: Config, **overrides):
    """`cfg.realtime` (validated) as the runner's own plain settings; realtime/ never sees pipeline types."""
    from realtime.settings import JamSettings

    values = cfg.realtime.model_dump()
    values.update(registry_name=cfg.project.name, tracking_uri=cfg.project.mlflow_uri, **overrides)
    try:
        return JamSettings.from_mapping(values)
    except ValueError as err:
        typer.secho(str(err), fg=typer.colors.RED, err=True)
        raise typer.Exit(2) from None


def _realtime_overrides(options: dict) -> list[str]:
    """Command-line options given (not None) as `realtime.<key>=<json>` overrides, validated with params.yaml."""
    given = {key: str(v) if isinstance(v, Path) else v for key, v in options.items() if v is not None}
    return [f"realtime.{key}={json.dumps(v)}" for key, v in given.items()]


def _adapter_weights(specs: list[str] | None) -> dict[str, float] | None:
    """`-a style` / `-a a=2 -a b=1` / `-a none` -> adapter weights (None: not given)."""
    if not specs:
        return None
    if specs == ["none"]:
        return {}
    weights = {}
    for spec in specs:
        name, _, weight = spec.partition("=")
        try:
            weights[name.strip()] = float(weight) if weight else 1.0
        except ValueError:
            raise typer.BadParameter(f"--adapter expects NAME or NAME=WEIGHT, got {spec!r}") from None
    return weights


PLAY_HELP = {
    "model": "Bundle folder, or models:/<name>@<alias> from the MLflow registry (project.mlflow_uri). "
    "Default: models:/<project.name>@champion.",
    "mode": "call_response: answer each phrase after a silence gap (or the trigger controller); "
    "continuous: accompany, planning --lookahead seconds ahead.",
    "input_file": "Play this MIDI file in real time as the human instead of listening to a live port.",
    "input_port": "Connect to this MIDI input port (exact name or unique substring). Default: virtual <client>-in.",
    "output_port": "Connect to this MIDI output port. Default: virtual <client>-out (with --input-file: none).",
    "backend": "rtmidi API: jack, alsa or auto (ALSA when /dev/snd/seq exists, else JACK).",
    "client_name": "MIDI client name (virtual ports are <client>-in and <client>-out).",
    "temperature": "Sampling temperature (> 0); lower is safer and more repetitive.",
    "top_p": "Nucleus sampling mass in (0, 1]; 1 disables.",
    "top_k": "Sample among the k likeliest tokens; 0 disables.",
    "tempo": "Tempo in BPM (default: the bundle's); sets the beat grid. A MIDI clock overrides it when followed.",
    "follow_clock": "Follow the tempo of an incoming MIDI clock (24 ppqn).",
    "bars": "call_response: bars per answer.",
    "gap": "call_response: seconds of silence (no key down) that end a phrase.",
    "trigger_cc": "call_response: controller number that ends a phrase when pressed (64 = sustain pedal).",
    "lookahead": "continuous: seconds of output planned ahead (less reacts faster, costs more compute).",
    "adapter": "Style: NAME or NAME=WEIGHT, repeatable for a weighted blend (-a style_a=2 -a style_b=1); "
    "'none' = base model only. Default: the bundle's default adapter.",
    "raw_weights": "Use blend weights as given instead of dividing them by their sum.",
    "dtype": "Inference dtype: float32, bfloat16 or float16.",
    "quantization": "none, or dynamic_int8 (int8 Linear layers, CPU).",
    "device": "auto (CUDA when present), cpu or cuda.",
    "threads": "torch threads (0 = torch default; 1 is fastest for tiny models).",
    "channel": "MIDI channel of the model's notes, 0-15.",
    "record": "Write the session (human and model tracks) to this MIDI file.",
    "no_record": "Do not record the session.",
    "duration": "Stop after this many seconds (default: Ctrl-C, or the end of --input-file).",
    "seed": "Sampling seed, for repeatable sessions.",
}


def _play_opt(name: str, *flags: str) -> typer.models.OptionInfo:
    return typer.Option(*flags, help=PLAY_HELP[name])


@commands.command()
def play(
    model: Annotated[str | None, _play_opt("model", "--model", "-m")] = None,
    mode: Annotated[str | None, _play_opt("mode")] = None,
    input_file: Annotated[Path | None, _play_opt("input_file", "--input-file", "--input", "-i")] = None,
    input_port: Annotated[str | None, _play_opt("input_port")] = None,
    output_port: Annotated[str | None, _play_opt("output_port")] = None,
    backend: Annotated[str | None, _play_opt("backend")] = None,
    client_name: Annotated[str | None, _play_opt("client_name")] = None,
    temperature: Annotated[float | None, _play_opt("temperature", "--temperature", "-t")] = None,
    top_p: Annotated[float | None, _play_opt("top_p")] = None,
    top_k: Annotated[int | None, _play_opt("top_k")] = None,
    tempo: Annotated[float | None, _play_opt("tempo")] = None,
    follow_clock: Annotated[bool | None, _play_opt("follow_clock", "--follow-clock/--no-follow-clock")] = None,
    bars: Annotated[float | None, _play_opt("bars")] = None,
    gap: Annotated[float | None, _play_opt("gap")] = None,
    trigger_cc: Annotated[int | None, _play_opt("trigger_cc")] = None,
    lookahead: Annotated[float | None, _play_opt("lookahead")] = None,
    adapter: Annotated[list[str] | None, _play_opt("adapter", "--adapter", "-a")] = None,
    raw_weights: Annotated[bool, _play_opt("raw_weights", "--raw-weights")] = False,
    dtype: Annotated[str | None, _play_opt("dtype")] = None,
    quantization: Annotated[str | None, _play_opt("quantization")] = None,
    device: Annotated[str | None, _play_opt("device")] = None,
    threads: Annotated[int | None, _play_opt("threads")] = None,
    channel: Annotated[int | None, _play_opt("channel")] = None,
    record: Annotated[Path | None, _play_opt("record")] = None,
    no_record: Annotated[bool, _play_opt("no_record", "--no-record")] = False,
    duration: Annotated[float | None, _play_opt("duration")] = None,
    seed: Annotated[int | None, _play_opt("seed")] = None,
    params: ParamsOpt = DEFAULT_PARAMS,
    set_: SetOpt = None,
) -> None:
    """Jam live: listen on MIDI (or a file played as the human), answer in the model's style, print latency at exit.

    Every control also lives in params.yaml under `realtime:`; options here override it for one session.
    """
    options = {
        "model": model, "mode": mode, "input_file": input_file, "input_port": input_port,
        "output_port": output_port, "backend": backend, "client_name": client_name, "temperature": temperature,
        "top_p": top_p, "top_k": top_k, "tempo_bpm": tempo, "follow_clock": follow_clock, "response_bars": bars,
        "silence_gap_s": gap, "trigger_cc": trigger_cc, "lookahead_s": lookahead,
        "adapters": _adapter_weights(adapter), "dtype": dtype, "quantization": quantization, "device": device,
        "threads": threads, "out_channel": channel, "record": record, "duration_s": duration, "seed": seed,
        "transport": "file" if input_file else None, "normalize_weights": False if raw_weights else None,
    }  # fmt: skip
    cfg = load(params, [*(set_ or []), *_realtime_overrides(options)])
    settings = _realtime_settings(cfg, **({"record": None} if no_record else {}))
    from realtime.bundle import BundleError
    from realtime.runner import run_jam
    from realtime.transport import TransportError

    try:
        summary = run_jam(settings)
    except (BundleError, TransportError) as err:
        typer.secho(str(err), fg=typer.colors.RED, err=True)
        raise typer.Exit(1) from None
    typer.echo(json.dumps(summary))


bench_app = typer.Typer(help="Speed measurements that print JSON.", no_args_is_help=True)
commands.add_typer(bench_app, name="bench")


BENCH_HELP = {
    "model": "Bundle folder, models:/<name>@<alias>, or 'random': a random-weight bundle of the size below "
    "(the music is noise; the cost is real).",
    "rounds": "Simulated phrases (after one warm-up round).",
    "mode": "call_response or continuous (default: realtime.mode).",
    "hidden": "random: hidden size.",
    "layers": "random: decoder layers.",
    "heads": "random: attention heads.",
    "vocab": "random: BPE vocabulary size.",
    "max_seq_len": "random: context length in tokens.",
    "e2e": "Also run a real-time session with a MIDI file as the human (about 3 s a round).",
    "json": "Print only the JSON result, on one line.",
}


def _bench_opt(name: str, *flags: str) -> typer.models.OptionInfo:
    return typer.Option(*flags, help=BENCH_HELP[name])


@bench_app.command("latency")
def bench_latency(
    model: Annotated[str, _bench_opt("model", "--model", "-m")] = "random",
    rounds: Annotated[int, _bench_opt("rounds")] = 20,
    mode: Annotated[str | None, _bench_opt("mode")] = None,
    hidden: Annotated[int, _bench_opt("hidden")] = 192,
    layers: Annotated[int, _bench_opt("layers")] = 4,
    heads: Annotated[int, _bench_opt("heads")] = 6,
    vocab: Annotated[int, _bench_opt("vocab")] = 1024,
    max_seq_len: Annotated[int, _bench_opt("max_seq_len")] = 256,
    e2e: Annotated[bool, _bench_opt("e2e", "--e2e")] = False,
    as_json: Annotated[bool, _bench_opt("json", "--json")] = False,
    params: ParamsOpt = DEFAULT_PARAMS,
    set_: SetOpt = None,
) -> None:
    """Latency p50/p95/p99 and real-time factor on simulated input, headless (no MIDI ports)."""
    overrides = _realtime_overrides({"mode": mode, "model": None if model == "random" else model})
    cfg = load(params, [*(set_ or []), *overrides])
    settings = _realtime_settings(cfg, transport="memory", record=None)
    import tempfile

    from realtime.benchmark import bench_latency as run_bench
    from realtime.bundle import BundleError
    from realtime.runner import prepare
    from realtime.synthetic import make_random_bundle

    with tempfile.TemporaryDirectory() as tmp:
        if model == "random":
            size = {"hidden": hidden, "layers": layers, "heads": heads, "intermediate": hidden * 8 // 3}
            bundle_dir = make_random_bundle(Path(tmp) / "bundle", bpe_vocab=vocab, max_seq_len=max_seq_len, **size)
            settings.model = str(bundle_dir)
        try:
            result = run_bench(prepare(settings), settings, rounds=rounds, e2e=e2e)
        except BundleError as err:
            typer.secho(str(err), fg=typer.colors.RED, err=True)
            raise typer.Exit(1) from None
    if not as_json:
        eng = result["engine"]
        line = f"p50 {eng['p50_ms']} ms  p95 {eng['p95_ms']} ms  p99 {eng['p99_ms']} ms  RTF {eng['rtf']}"
        typer.echo(line, err=True)
    typer.echo(json.dumps(result, indent=None if as_json else 2))


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
    from symusic import Score

    from pipeline.evaluate.features import notes_from_score
    from pipeline.evaluate.plots import session_roll_png

    try:
        score = Score(str(session))
    except Exception as err:
        typer.secho(f"cannot read {session}: {err}", fg=typer.colors.RED, err=True)
        raise typer.Exit(1) from None
    tracks = {}
    for i, track in enumerate(score.tracks):
        single = Score(score.ticks_per_quarter)
        single.tempos, single.tracks = score.tempos, [track]
        tracks[track.name or f"track {i}"] = notes_from_score(single)
    for name, notes in tracks.items():
        span = max((n.end for n in notes), default=0.0)
        typer.echo(f"{name}: {len(notes)} notes over {span:.1f} beats")
    out = session_roll_png(tracks, png or session.with_suffix(".png"), title=session.name)
    typer.echo(f"piano roll: {out}")
