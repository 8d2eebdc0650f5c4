"""`JamSettings`: the runner's own plain configuration (no pydantic, no pipeline import).

`pipeline/cli.py` validates `params.yaml`'s `realtime:` section and builds this from it with
`JamSettings.from_mapping(cfg.realtime.model_dump())`; `python -m realtime` builds it from its own flags.
Field names match the config section one to one.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MODES = ("call_response", "continuous")
TRANSPORTS = ("midi", "file", "memory")
BACKENDS = ("auto", "jack", "alsa")
DTYPES = ("float32", "bfloat16", "float16")
QUANTIZATIONS = ("none", "dynamic_int8")
DEVICES = ("auto", "cpu", "cuda")


@dataclass
class JamSettings:
    """Everything `run_jam` needs; defaults match `RealtimeConfig` in pipeline/core/config.py."""

    model: str | None = None  # bundle folder or models:/<name>@<alias>
    registry_name: str = "jam-partner"  # used when model is None: models:/<registry_name>@champion
    tracking_uri: str | None = "sqlite:///mlruns/mlflow.db"  # MLflow store for models:/ URIs
    mode: str = "call_response"
    temperature: float = 1.0
    top_p: float = 0.95
    top_k: int = 0
    tempo_bpm: float | None = None  # None: the bundle's tempo_bpm
    follow_clock: bool = True
    beats_per_bar: int = 4
    response_bars: float = 2.0
    silence_gap_s: float = 0.8
    trigger_cc: int | None = None
    lookahead_s: float = 0.5
    adapters: dict[str, float] | None = None  # None: bundle default adapter; {}: base only
    normalize_weights: bool = True
    dtype: str = "float32"
    quantization: str = "none"
    device: str = "auto"
    threads: int = 1
    max_seq_len: int | None = None
    transport: str = "midi"
    backend: str = "auto"
    client_name: str = "jam"
    input_port: str | None = None
    output_port: str | None = None
    input_file: Path | None = None
    record: Path | None = None
    out_channel: int = 0
    max_note_s: float = 4.0
    tail_s: float = 1.0
    duration_s: float | None = None
    seed: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # transport-specific objects (tests: memory ports)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the field for values the runner cannot use."""
        checks = [
            (self.mode in MODES, "mode", f"one of {MODES}"),
            (self.transport in TRANSPORTS, "transport", f"one of {TRANSPORTS}"),
            (self.backend in BACKENDS, "backend", f"one of {BACKENDS}"),
            (self.dtype in DTYPES, "dtype", f"one of {DTYPES}"),
            (self.quantization in QUANTIZATIONS, "quantization", f"one of {QUANTIZATIONS}"),
            (self.device in DEVICES, "device", f"one of {DEVICES}"),
            (self.temperature > 0, "temperature", "> 0"),
            (0 < self.top_p <= 1, "top_p", "in (0, 1]"),
            (self.top_k >= 0, "top_k", ">= 0"),
            (self.tempo_bpm is None or self.tempo_bpm > 0, "tempo_bpm", "> 0"),
            (self.response_bars > 0, "response_bars", "> 0"),
            (self.silence_gap_s > 0, "silence_gap_s", "> 0"),
            (self.lookahead_s > 0, "lookahead_s", "> 0"),
            (0 <= self.out_channel <= 15, "out_channel", "0..15"),
            (self.trigger_cc is None or 0 <= self.trigger_cc <= 127, "trigger_cc", "0..127 or None"),
            (self.threads >= 0, "threads", ">= 0"),
            (self.max_note_s > 0, "max_note_s", "> 0"),
        ]
        for ok, name, expected in checks:
            if not ok:
                raise ValueError(f"realtime.{name}: expected {expected}, got {getattr(self, name)!r}")
        if self.transport == "file" and self.input_file is None:
            raise ValueError("realtime.input_file: required when transport is 'file'")

    @classmethod
    def from_mapping(cls, values: dict[str, Any], **overrides: Any) -> JamSettings:
        """Build from a plain dict (e.g. a validated config section dumped), ignoring unknown keys."""
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in {**values, **overrides}.items() if k in names}
        for key in ("input_file", "record"):
            if kwargs.get(key) is not None:
                kwargs[key] = Path(kwargs[key])
        return cls(**kwargs)

    @property
    def model_ref(self) -> str:
        """The bundle to load: `model`, else the registry's champion."""
        return self.model or f"models:/{self.registry_name}@champion"
