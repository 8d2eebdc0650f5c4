"""params.yaml parsed once into typed, validated models.

`load_config(path, overrides)` is the only entry point. A bad value fails before any work, naming the dotted key
and what was expected (`ConfigError`). Every section forbids unknown keys so a typo is an error, not a silent
default.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pipeline import constants as C


class ConfigError(ValueError):
    """A params file or override that does not validate; the message names the dotted key."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ProjectConfig(Section):
    name: str = "jam-partner"  # MLflow experiment and registered model name
    data_dir: Path = Path("data")
    mlflow_uri: str = "sqlite:///mlruns/mlflow.db"
    artifact_dir: Path = Path("mlruns/artifacts")
    seed: int = 1234
    workers: int = Field(2, ge=1)  # processes for per-item CPU work (transcription)


class DemoConfig(Section):
    """Offline demo sources: public-domain scores rendered to piano audio, held out of the base corpus."""

    enabled: bool = True
    composers: list[str] = ["joplin", "schumann", "chopin", "mozart", "beethoven", "haydn"]
    max_pieces: int = Field(30, ge=1)
    excerpt_s: float = Field(30.0, gt=0)  # seconds rendered per piece; transcription time grows with it
    soundfont: Path = Path("/usr/share/sounds/sf2/FluidR3_GM.sf2")
    sample_rate: int = Field(22050, ge=8000)  # Hz; Basic Pitch resamples to 22050 anyway
    program: int = Field(0, ge=0, le=127)  # GM Acoustic Grand Piano


class AcquireConfig(Section):
    sources: list[str] = []  # YouTube video/playlist URLs (anything yt-dlp supports), audio/MIDI files or folders
    max_duration_s: float = Field(1800.0, gt=0)  # longer uploads are skipped (likely not a single performance)
    retries: int = Field(3, ge=0)
    backoff_s: float = Field(2.0, ge=0)  # first retry delay, doubled each time
    sample_rate: int = Field(22050, ge=8000)  # audio is stored as mono WAV at this rate
    socket_timeout_s: float = Field(30.0, gt=0)


class TranscribeConfig(Section):
    model: Literal["icassp_2022"] = "icassp_2022"  # Basic Pitch's shipped model (run through ONNX)
    onset_threshold: float = Field(0.5, gt=0, lt=1)
    frame_threshold: float = Field(0.3, gt=0, lt=1)
    minimum_note_length_ms: float = Field(58.0, gt=0)  # Basic Pitch's default (~5 frames)
    min_pitch: int = Field(C.PIANO_MIN_PITCH, ge=0, le=127)
    max_pitch: int = Field(C.PIANO_MAX_PITCH, ge=0, le=127)
    melodia_trick: bool = True
    estimate_tempo: bool = True  # librosa beat tracking; the tokenizer's time grid is in beats
    default_tempo: float = Field(120.0, gt=0)  # BPM when estimation is off or fails

    @model_validator(mode="after")
    def _pitch_order(self) -> TranscribeConfig:
        if self.min_pitch >= self.max_pitch:
            raise ValueError("min_pitch must be below max_pitch")
        return self


class CleanConfig(Section):
    min_notes: int = Field(16, ge=1)  # fewer notes: empty or failed transcription
    min_duration_s: float = Field(4.0, ge=0)
    min_note_s: float = Field(0.03, ge=0)  # shorter notes are transcription ghosts
    min_velocity: int = Field(8, ge=0, le=127)
    min_pitch: int = Field(C.PIANO_MIN_PITCH, ge=0, le=127)
    max_pitch: int = Field(C.PIANO_MAX_PITCH, ge=0, le=127)
    segment_s: float = Field(0.0, ge=0)  # split performances longer than this into segments; 0 keeps them whole


class SplitConfig(Section):
    valid_fraction: float = Field(0.1, ge=0, lt=1)
    test_fraction: float = Field(0.15, ge=0, lt=1)
    seed: int = 1234

    @model_validator(mode="after")
    def _fractions(self) -> SplitConfig:
        if self.valid_fraction + self.test_fraction >= 1:
            raise ValueError("valid_fraction + test_fraction must leave something to train on")
        return self


class AugmentConfig(Section):
    pitch_offsets: list[int] = [-3, -2, -1, 1, 2, 3]  # semitones; copies leaving the piano range are dropped
    velocity_offsets: list[int] = [-8, 8]
    duration_offsets: list[float] = [-0.25, 0.25]  # beats
    tempo_factors: list[float] = [0.9, 1.1]  # time stretch; miditok has none, so we do this one ourselves
    all_offset_combinations: bool = False  # True: every pitch x velocity x duration combination

    @field_validator("tempo_factors")
    @classmethod
    def _positive(cls, v: list[float]) -> list[float]:
        if any(f <= 0 for f in v):
            raise ValueError("tempo factors must be > 0")
        return v


class BaseCorpusConfig(Section):
    source: Literal["music21", "folder"] = "music21"
    path: Path | None = None  # folder of MIDI files when source is "folder" (e.g. MAESTRO, PiJAMA)
    composers: list[str] = ["bach", "palestrina", "monteverdi", "handel", "corelli"]
    max_pieces: int = Field(150, ge=1)  # music21 parsing is ~0.5 s a score; cached per piece

    @model_validator(mode="after")
    def _path_for_folder(self) -> BaseCorpusConfig:
        if self.source == "folder" and self.path is None:
            raise ValueError("path is required when source is 'folder'")
        return self


class TokenizeConfig(Section):
    kind: Literal["MIDILike", "TSD", "REMI", "Structured"] = "MIDILike"
    vocab_size: int = Field(1024, ge=64)  # after BPE; base vocabulary is ~300
    beat_res: dict[str, int] = {"0_4": 8, "4_12": 4}  # beat range -> samples per beat
    num_velocities: int = Field(16, ge=1, le=127)
    use_sustain_pedals: bool = False
    max_seq_len: int = Field(256, ge=16)  # tokens per training window
    overlap: int = Field(64, ge=0)  # tokens shared by consecutive windows

    @model_validator(mode="after")
    def _overlap(self) -> TokenizeConfig:
        if self.overlap >= self.max_seq_len:
            raise ValueError("overlap must be smaller than max_seq_len")
        return self


class Config(Section):
    project: ProjectConfig = ProjectConfig()
    demo: DemoConfig = DemoConfig()
    acquire: AcquireConfig = AcquireConfig()
    transcribe: TranscribeConfig = TranscribeConfig()
    clean: CleanConfig = CleanConfig()
    split: SplitConfig = SplitConfig()
    augment: AugmentConfig = AugmentConfig()
    base: BaseCorpusConfig = BaseCorpusConfig()
    tokenize: TokenizeConfig = TokenizeConfig()

    def stage_dir(self, stage: str) -> Path:
        return self.project.data_dir / stage


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    node = tree
    *parents, leaf = dotted.split(".")
    for key in parents:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{dotted}: '{key}' is not a section")
        node = child
    node[leaf] = value


def parse_override(text: str) -> tuple[str, Any]:
    """`a.b=3` -> ("a.b", 3). The value is YAML, so lists and numbers keep their types."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set expects dotted.key=value, got {text!r}")
    return key.strip(), yaml.safe_load(raw) if raw.strip() else ""


def _format_errors(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "<root>"
        got = e.get("input")
        got_s = "" if isinstance(got, dict) else f" (got {got!r})"
        lines.append(f"  {key}: {e['msg']}{got_s}")
    return "invalid params:\n" + "\n".join(lines)


def config_from_dict(tree: dict[str, Any]) -> Config:
    try:
        return Config.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(_format_errors(err)) from None


def load_config(path: Path | str | None = "params.yaml", overrides: list[str] | None = None) -> Config:
    """Read params.yaml (missing file: all defaults), apply `dotted.key=value` overrides, validate."""
    tree: dict[str, Any] = {}
    if path is not None and Path(path).exists():
        loaded = yaml.safe_load(Path(path).read_text())
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping at the top level")
        tree = loaded or {}
    elif path is not None and str(path) != "params.yaml":
        raise ConfigError(f"params file not found: {path}")
    for text in overrides or []:
        key, value = parse_override(text)
        _set_dotted(tree, key, value)
    return config_from_dict(tree)


def section_json(section: BaseModel) -> str:
    """Canonical JSON of a section: the stable text hashed into cache keys and written beside outputs."""
    return json.dumps(section.model_dump(mode="json"), sort_keys=True)
