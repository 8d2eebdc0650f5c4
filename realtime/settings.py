"""The jam runner's settings, written once: params.yaml `realtime:`, `jam play` options, `python -m realtime` flags.

`RealtimeSettings` is the one settings type. `pipeline/core/config.py` nests it as `Config.realtime`; `jam play`
(pipeline/cli/jam.py) and `python -m realtime` (realtime/__main__.py) generate one option per field from
`flags()`, named after the field (`silence_gap_s` -> `--silence-gap-s`), with its description as help.

`JamSettings` is what `run_jam` takes: the same fields plus the three that are not session controls and so are not
in params.yaml's section. `registry_name` and `tracking_uri` come from `project.name` / `project.mlflow_uri` in
`jam play` (flags of their own in `python -m realtime`); `extra` carries objects built in code (tests).
"""

from __future__ import annotations

import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

Mode = Literal["call_response", "continuous"]
Transport = Literal["midi", "file", "memory"]


class RealtimeSettings(BaseModel):
    """How the jam runner loads a model, listens, answers and where MIDI goes. Units are in the field names."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str | None = Field(
        None,
        description="Bundle folder, or models:/<name>@<alias> from the MLflow registry. "
        "None: models:/<registry name>@champion.",
    )
    mode: Mode = Field(
        "call_response",
        description="call_response: answer each phrase after a silence gap (or the trigger controller); "
        "continuous: accompany while listening, planning lookahead_s ahead.",
    )
    temperature: float = Field(1.0, gt=0, description="Sampling temperature; lower is safer and more repetitive.")
    top_p: float = Field(0.95, gt=0, le=1, description="Nucleus sampling mass; 1 disables.")
    top_k: int = Field(0, ge=0, description="Sample among the k likeliest tokens; 0 disables.")
    tempo_bpm: float | None = Field(
        None, gt=0, description="Beats per minute of the beat grid; None: the bundle's. A followed MIDI clock wins."
    )
    follow_clock: bool = Field(True, description="Follow the tempo of an incoming MIDI clock (24 ppqn).")
    beats_per_bar: int = Field(4, ge=1, description="Beats per bar, the unit of response_bars.")
    response_bars: float = Field(2.0, gt=0, description="call_response: bars per answer.")
    silence_gap_s: float = Field(
        0.8, gt=0, description="call_response: seconds with no key down that end a phrase (~1.5 beats at 120 BPM)."
    )
    trigger_cc: int | None = Field(
        None,
        ge=0,
        le=127,
        description="call_response: controller number that ends a phrase at once (64 = sustain pedal); "
        "None: the silence gap only (pianists pedal mid-phrase).",
    )
    lookahead_s: float = Field(
        0.5, gt=0, description="continuous: seconds of output planned ahead; less reacts faster, costs more compute."
    )
    density_ratio: float | None = Field(
        1.0,
        ge=0,
        description="continuous: the model starts at most this many notes per note the human started over the last "
        "density_window_beats (an accompanist does not drown the soloist); None: no limit.",
    )
    density_window_beats: float = Field(8.0, gt=0, description="continuous: beats the density cap looks back over.")
    adapters: dict[str, float] | None = Field(
        None,
        description="Style adapters and blend weights, NAME or NAME=WEIGHT (repeatable; 'none' = base model only). "
        "None: the bundle's default adapter.",
    )
    normalize_weights: bool = Field(
        True, description="Divide blend weights by their sum, so a blend keeps one adapter's strength."
    )
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="Inference dtype; float32 is fastest for tiny models on CPU."
    )
    quantization: Literal["none", "dynamic_int8"] = Field(
        "none",
        description="dynamic_int8: int8 projections (CPU; logits no longer exact). Measured: 2.7x faster per id "
        "for the params-gpu.yaml model (memory-bound), slower per id at demo size (prefills 2x faster).",
    )
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: CUDA when present, else CPU.")
    threads: int = Field(
        1, ge=0, description="torch threads; 1 is fastest for tiny matmuls and leaves a core for I/O; 0: torch's."
    )
    max_seq_len: int | None = Field(None, ge=16, description="Context window in tokens; None: the bundle's.")
    transport: Transport = Field(
        "midi",
        description="midi: live ports (ALSA or JACK); file: input_file played as the human; "
        "memory: in-process ports (tests, benchmarks).",
    )
    backend: Literal["auto", "jack", "alsa"] = Field(
        "auto", description="rtmidi API; auto: ALSA when /dev/snd/seq exists, else JACK."
    )
    client_name: str = Field("jam", description="MIDI client name; virtual ports are <client>-in and <client>-out.")
    input_port: str | None = Field(
        None, description="MIDI input port to connect to (exact name or unique substring); None: a virtual port."
    )
    output_port: str | None = Field(
        None, description="MIDI output port to connect to; None: a virtual port (transport file: no MIDI output)."
    )
    input_file: Path | None = Field(
        None, description="MIDI file played in real time as the human; giving it on the command line implies "
        "transport file."
    )  # fmt: skip
    record: Path | None = Field(None, description="Write the session (human and model tracks) to this MIDI file.")
    out_channel: int = Field(0, ge=0, le=15, description="MIDI channel of the model's notes, 0-15 (0 = channel 1).")
    max_note_beats: float | None = Field(
        None,
        gt=0,
        description="Beats; decoding forces a model note's NoteOff once it has sounded this long. "
        "None: the bundle's (the training corpus's 99.5th percentile note length).",
    )
    max_polyphony: int | None = Field(
        None,
        ge=1,
        description="Model notes sounding at once, at most: no note starts while this many sound. "
        "None: the bundle's (the training corpus's 99.5th percentile of notes sounding at an onset).",
    )
    max_note_s: float = Field(
        10.0,
        gt=0,
        description="Seconds; last resort: the scheduler ends a model note held longer (counted in the summary). "
        "Above the note-ending rule's limit at usual tempi (8 beats = 4 s at 120 BPM).",
    )
    tail_s: float = Field(1.0, ge=0, description="Seconds the last answer may ring after the input file ends.")
    duration_s: float | None = Field(
        None, gt=0, description="Stop after this many seconds; None: Ctrl-C, or the end of the input file."
    )
    seed: int | None = Field(None, description="Sampling seed for repeatable sessions; None: a new one each time.")

    @model_validator(mode="after")
    def _file_needs_input(self) -> RealtimeSettings:
        if self.transport == "file" and self.input_file is None:
            raise ValueError("input_file is required when transport is 'file'")
        return self


class JamSettings(RealtimeSettings):
    """`RealtimeSettings` plus what a session needs that is not a params.yaml control (see the module docstring)."""

    model_config = ConfigDict(extra="forbid", frozen=True, arbitrary_types_allowed=True)

    registry_name: str = Field(
        "jam-partner", description="Registered model loaded when model is None: models:/<name>@champion."
    )
    tracking_uri: str | None = Field("sqlite:///mlruns/mlflow.db", description="MLflow store for models:/ URIs.")
    extra: dict[str, Any] = Field(default_factory=dict, exclude=True)  # objects built in code: extra["transport"]

    @property
    def model_ref(self) -> str:
        """The bundle to load: `model`, else the registry's champion."""
        return self.model or f"models:/{self.registry_name}@champion"

    @classmethod
    def build(cls, values: dict[str, Any]) -> JamSettings:
        """Validate plain values; a bad one raises ValueError naming `realtime.<key>` and what was expected."""
        try:
            return cls.model_validate(values)
        except ValidationError as err:
            raise ValueError("\n".join(map(_error_line, err.errors()))) from None

    def replace(self, **changes: Any) -> JamSettings:
        """A copy with `changes`, validated like the original."""
        return self.build({**dict(self), **changes})


def _error_line(error: Any) -> str:
    got = error.get("input")
    got_s = "" if isinstance(got, dict) else f" (got {got!r})"
    return f"realtime.{'.'.join(map(str, error['loc'])) or '<root>'}: {error['msg']}{got_s}"


@dataclass(frozen=True)
class Flag:
    """One command-line option generated from a settings field.

    `kind` is the value type (str, int, float, Path or bool); `choices` is set for Literal fields; `repeat` marks
    adapters (NAME or NAME=WEIGHT, repeatable, parsed by `parse_adapters`).
    """

    name: str
    flags: tuple[str, ...]
    kind: type
    help: str
    default: Any
    choices: tuple[str, ...] | None = None
    repeat: bool = False


ALIASES = {"model": ("-m",), "temperature": ("-t",), "input_file": ("--input", "-i"), "adapters": ("-a", "--adapter")}


def _kind(annotation: Any) -> tuple[type, tuple[str, ...] | None]:
    """Value type and Literal choices of a field annotation, `X | None` unwrapped."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and len(args) == 1:
        annotation = args[0]
    if typing.get_origin(annotation) is Literal:
        return str, tuple(typing.get_args(annotation))
    if typing.get_origin(annotation) is dict:
        return dict, None
    return annotation, None


def flags(model: type[BaseModel] = RealtimeSettings) -> list[Flag]:
    """One `Flag` per field of `model` (fields without a description, like `extra`, are not options)."""
    out = []
    for name, info in model.model_fields.items():
        if info.description is None:
            continue
        kind, choices = _kind(info.annotation)
        names = ("--" + name.replace("_", "-"), *ALIASES.get(name, ()))
        repeat = kind is dict
        out.append(Flag(name, names, str if repeat else kind, info.description, info.default, choices, repeat))
    return out


def parse_adapters(specs: list[str] | None) -> dict[str, float] | None:
    """`["style"]` / `["a=2", "b=1"]` (or `["a=2,b=1"]`) / `["none"]` -> adapter weights; None when not given."""
    if not specs:
        return None
    items = [item.strip() for spec in specs for item in spec.split(",") if item.strip()]
    if items == ["none"]:
        return {}
    weights = {}
    for item in items:
        name, _, weight = item.partition("=")
        try:
            weights[name.strip()] = float(weight) if weight else 1.0
        except ValueError:
            raise ValueError(f"realtime.adapters: expected NAME or NAME=WEIGHT, got {item!r}") from None
    return weights
