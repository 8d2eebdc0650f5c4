"""params.yaml parsed once into typed, validated models.

`load_config(path, overrides)` is the only entry point. A bad value fails before any work, naming the dotted key
and what was expected (`ConfigError`). Every section forbids unknown keys so a typo is an error, not a silent
default.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from pipeline.core import constants as C
from pipeline.core.profile import ServicesConfig
from pipeline.core.section import Section
from pipeline.core.styles import DEFAULT_STYLES, STYLE_NAME_RE, DemoConfig, StyleConfig, TranscriberName
from pipeline.core.training import CheckpointConfig, FinetuneConfig, ModelConfig, PretrainConfig
from realtime.settings import RealtimeSettings


class ConfigError(ValueError):
    """A params file or override that does not validate; the message names the dotted key."""


class ProjectConfig(Section):
    name: str = "jam-partner"  # MLflow experiment and registered model name
    data_dir: Path = Path("data")
    mlflow_uri: str = "sqlite:///mlruns/mlflow.db"
    artifact_dir: Path = Path("mlruns/artifacts")
    seed: int = 1234
    workers: int = Field(2, ge=1)  # processes for per-item CPU work (transcription, evaluation's samples)
    # where the item-wise stages (acquire, transcribe, clean, augment, tokenize) run their items: local processes,
    # or a Dask cluster (pipeline/core/cluster.py says why Dask); same outputs either way
    executor: Literal["processes", "dask"] = "processes"
    cluster_address: str | None = None  # Dask scheduler, e.g. tcp://10.0.0.5:8786; none: a local cluster on 127.0.0.1


class AcquireConfig(Section):
    max_duration_s: float = Field(1800.0, gt=0)  # longer uploads are skipped (likely not a single performance)
    retries: int = Field(3, ge=0)
    backoff_s: float = Field(2.0, ge=0)  # first retry delay, doubled each time
    sample_rate: int = Field(22050, ge=8000)  # audio is stored as mono WAV at this rate
    socket_timeout_s: float = Field(30.0, gt=0)


class TranscribeConfig(Section):
    # transkun: piano-specific, key releases and the pedal (onset F1 0.98 on performances, README "Transcription");
    # basic_pitch: any instrument, ~15x faster on a CPU. A style may name its own (`styles.<name>.transcriber`).
    backend: TranscriberName = "transkun"
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: CUDA when torch sees a GPU (Transkun; Basic Pitch: CPU)
    note_ends: Literal["sounding", "key_release"] = "sounding"  # sounding: notes held on through the sustain pedal
    min_audio_s: float = Field(1.0, gt=0)  # seconds; shorter audio is reported, not transcribed
    # Transkun's segment loop: windows of segment_s every hop_s seconds (its conf: 16 / 8; 12 s: 1.5x fewer
    # segments, 6.9x real time here with bfloat16, but a key release 0.35 s early in a test)
    segment_s: float = Field(16.0, gt=0)  # seconds
    hop_s: float = Field(8.0, gt=0)  # seconds
    quantize: bool = False  # int8 dynamic quantization of Transkun's Linear layers on CPU
    # bfloat16: autocast of Transkun's backbone + scorer (Viterbi in float32): 1.4-1.8x on a CPU with avx512_bf16;
    # auto: bfloat16 where the CPU (AVX-512 BF16, AMX) or the GPU computes it natively, else float32
    precision: Literal["auto", "float32", "bfloat16"] = "auto"
    # Transkun's attention and residual blocks on 4-D contiguous tensors: the same arithmetic through torch's fused
    # kernels, 1.6x faster in bfloat16 on 2 cores (README "Transcription"); false: its forward as shipped
    lean_forward: bool = True
    batch_segments: int = Field(1, ge=1)  # segments per forward (~+1 GB each; slower on 2 CPU cores: 0.85x at 2)
    # Basic Pitch
    model: Literal["icassp_2022"] = "icassp_2022"  # Basic Pitch's shipped model (run through ONNX)
    onset_threshold: float = Field(0.6, gt=0, lt=1)  # 0.5 (Basic Pitch default) admits octave ghosts
    frame_threshold: float = Field(0.3, gt=0, lt=1)
    minimum_note_length_ms: float = Field(58.0, gt=0)  # ms (~5 model frames); basic-pitch 0.4.0's is 127.7
    min_pitch: int = Field(C.PIANO_MIN_PITCH, ge=0, le=127)
    max_pitch: int = Field(C.PIANO_MAX_PITCH, ge=0, le=127)
    melodia_trick: bool = False  # on: more octave/twelfth ghosts on piano (bench/transcribe.py)
    estimate_tempo: bool = True  # librosa beat tracking; the tokenizer's time grid is in beats
    default_tempo: float = Field(120.0, gt=0)  # BPM when estimation is off or fails

    @model_validator(mode="after")
    def _pitch_order(self) -> TranscribeConfig:
        if self.min_pitch >= self.max_pitch:
            raise ValueError("min_pitch must be below max_pitch")
        if self.hop_s >= self.segment_s:
            raise ValueError("hop_s must be below segment_s (segments overlap to stitch notes)")
        return self


class CleanConfig(Section):
    min_notes: int = Field(16, ge=1)  # fewer notes: empty or failed transcription
    min_duration_s: float = Field(4.0, ge=0)
    min_note_s: float = Field(0.03, ge=0)  # shorter notes are transcription ghosts
    min_velocity: int = Field(8, ge=0, le=127)
    min_pitch: int = Field(C.PIANO_MIN_PITCH, ge=0, le=127)
    max_pitch: int = Field(C.PIANO_MAX_PITCH, ge=0, le=127)
    segment_s: float = Field(0.0, ge=0)  # split performances longer than this into segments; 0 keeps them whole

    @model_validator(mode="after")
    def _pitch_order(self) -> CleanConfig:
        if self.min_pitch >= self.max_pitch:
            raise ValueError("min_pitch must be below max_pitch")
        return self


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
    # time stretch: note onsets and durations in ticks are multiplied by the factor (1.1 = 10% slower), on the
    # original and on every offset copy; miditok has none, so we do this one ourselves
    tempo_factors: list[float] = [0.9, 1.1]
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
    # music21 corpus composers or collections, one work each in turn (sorted paths; a tune collection gives one work
    # per tune); bach chorales parse in ~0.08 s, a folk tune 0.04-0.3 s, palestrina ~0.2 s, monteverdi madrigals
    # ~0.6 s. Must not overlap demo.composers (the demo is held-out style data).
    composers: list[str] = ["bach", "palestrina", "monteverdi", "handel", "corelli"]
    max_pieces: int = Field(300, ge=1)  # pieces at most (either source); music21 parsing ~0.2 s a score, cached
    # music21 scores played like a pianist (pipeline/data/perform.py: rubato, dynamics, chord spreads) at the beat a
    # listener hears, so the base speaks the surface of recordings as the style data does; a folder of MIDI is taken
    # as it is. Off in the demo: measured there with a broader base, it brought the base's NLL on the styles from
    # 7.0 to 5.5 but the classical adapter's attribution from 0.92 to 0.50 (README "Measured")
    perform: bool = False

    @model_validator(mode="after")
    def _path_for_folder(self) -> BaseCorpusConfig:
        if self.source == "folder" and self.path is None:
            raise ValueError("path is required when source is 'folder'")
        return self


class TokenizeConfig(Section):
    kind: Literal["MIDILike", "TSD", "REMI", "Structured"] = "MIDILike"
    vocab_size: int = Field(1024, ge=64)  # after BPE; base vocabulary is 385 with these defaults (no BPE if <=)
    beat_res: dict[str, int] = {"0_4": 8, "4_12": 4}  # beat range -> samples per beat
    num_velocities: int = Field(16, ge=1, le=127)
    use_sustain_pedals: bool = False
    max_seq_len: int = Field(256, ge=16)  # tokens per training window
    overlap: int = Field(64, ge=0)  # tokens shared by consecutive windows
    # BPE merges stay inside a bar, so bars already played keep their ids while a live performance grows.
    encode_ids_split: Literal["bar", "beat", "no"] = "bar"
    bpe_max_files: int = Field(400, ge=1)  # files sampled (seeded) to train BPE; bounds its time
    bpe_max_tokens_per_file: int = Field(4096, ge=1)  # base tokens per file fed to BPE training; bounds its time
    # share of training notes (style + base train) at most `max_note_beats` long; the note-ending rule forces a
    # NoteOff past it, so 0.995 leaves the corpus's own long notes alone and ends only the model's runaways; the same
    # quantile of the notes sounding at an onset is the polyphony rule's `max_polyphony`
    note_length_quantile: float = Field(0.995, gt=0, le=1)

    @field_validator("beat_res")
    @classmethod
    def _beat_ranges(cls, v: dict[str, int]) -> dict[str, int]:
        if not v:
            raise ValueError("beat_res needs at least one beat range")
        for key, res in v.items():
            lo, sep, hi = key.partition("_")
            if not (sep and lo.isdigit() and hi.isdigit() and int(lo) < int(hi)) or res < 1:
                raise ValueError(f"beat_res wants 'start_end' beat ranges -> samples per beat >= 1, got {key}: {res}")
        return v

    @model_validator(mode="after")
    def _overlap(self) -> TokenizeConfig:
        if self.overlap >= self.max_seq_len:
            raise ValueError("overlap must be smaller than max_seq_len")
        return self


class EvaluateConfig(Section):
    """Held-out evaluation of trained runs (`jam evaluate`); any change here re-evaluates every run."""

    max_windows: int = Field(0, ge=0)  # test windows scored for NLL; 0 = all (bounds time on big test sets)
    batch_size: int = Field(8, ge=1)  # windows per forward pass
    n_prompts: int = Field(4, ge=1)  # held-out pieces per style (test, then valid) whose openings are prompts
    prompt_tokens: int = Field(32, ge=1)  # tokens of each piece's opening given as prompt (after BOS)
    # one sample per prompt per seed, fixed so runs compare on equal footing; 2 styles x 4 x 5 = 40 samples per
    # model keep the style_score CI ~0.03 and the attribution CI ~0.3 wide on the demo (24: ~0.4)
    seeds: list[int] = Field([0, 1, 2, 3, 4], min_length=1)
    sample_beats: float = Field(32.0, gt=0)  # beats of playing per continuation (EOS never sampled)
    n_tokens: int = Field(1024, ge=1)  # ids at most per continuation, whatever the beats (a model that
    # never moves time must still stop)
    # sampling controls and note limit: the runner's own (`realtime.temperature/top_p/top_k/max_note_beats`)
    max_open_beats: float = Field(16.0, gt=0)  # a NoteOn still unmatched this many beats later is a hung note
    oa_method: Literal["kde", "hist"] = "kde"  # density estimate for overlapping areas (Yang & Lerch use KDE)
    window_beats: float = Field(8.0, gt=0)  # window for pitch range and note density (two 4/4 bars)
    plots: int = Field(2, ge=0)  # piano-roll PNGs logged per model
    audio: int = Field(4, ge=0)  # samples per model rendered to WAV (fluidsynth, ~0.3 s each) and logged under eval/
    bootstrap: int = Field(100, ge=10)  # bootstrap resamples per 95 % CI (nll_ratio, style_score)
    # forgetting: relative rise of the base corpus test NLL (fine-tune vs its base) allowed, logged as
    # `forgetting_ok` and enforced by promotion's forgetting gate; demo: +23 % / +35 % (160 steps), +46 % (240)
    max_forgetting: float = Field(0.40, ge=0)


class PromoteConfig(Section):
    """Which evaluated fine-tune becomes the registry's `champion` (`jam promote`)."""

    metric: str = "test_nll"  # MLflow metric that ranks fine-tune runs
    mode: Literal["min", "max"] = "min"  # min for losses, max for scores (e.g. style_score)
    min_gain: float = Field(0.02, ge=0, lt=1)  # gate: nll_ratio (finetune/base) <= 1 - min_gain
    # gate: share of samples (played through the runner's engine) that end every note; the note-ending rule makes
    # it 1.00 on the demo, so anything below 0.99 means the rule or the model broke
    min_validity: float = Field(0.99, ge=0, le=1)


class Config(Section):
    project: ProjectConfig = ProjectConfig()
    demo: DemoConfig = DemoConfig()
    # style name -> its sources, in order: the first is the bundle's default adapter
    styles: dict[str, StyleConfig] = Field(DEFAULT_STYLES, min_length=1)
    acquire: AcquireConfig = AcquireConfig()
    transcribe: TranscribeConfig = TranscribeConfig()
    clean: CleanConfig = CleanConfig()
    split: SplitConfig = SplitConfig()
    augment: AugmentConfig = AugmentConfig()
    base: BaseCorpusConfig = BaseCorpusConfig()
    tokenize: TokenizeConfig = TokenizeConfig()
    model: ModelConfig = ModelConfig()
    pretrain: PretrainConfig = PretrainConfig()
    finetune: FinetuneConfig = FinetuneConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    promote: PromoteConfig = PromoteConfig()
    services: ServicesConfig = ServicesConfig()  # pipeline/core/profile.py: shared services across machines
    realtime: RealtimeSettings = RealtimeSettings()  # defined in realtime/settings.py: the runner stands alone

    @field_validator("styles")
    @classmethod
    def _style_names(cls, v: dict[str, StyleConfig]) -> dict[str, StyleConfig]:
        bad = [name for name in v if not re.match(STYLE_NAME_RE, name)]
        if bad:
            raise ValueError(f"style names must be lower-case letters, digits, '-' or '_' (they name folders): {bad}")
        return v

    @model_validator(mode="after")
    def _demo_held_out(self) -> Config:
        shared = sorted(set(self.demo.composers) & set(self.base.composers))
        if self.demo.enabled and self.base.source == "music21" and shared:
            raise ValueError(f"demo.composers and base.composers must not overlap (the demo is held out): {shared}")
        return self

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
