"""Numbers the pipeline shares. Tunable values live in params.yaml; these are facts, not knobs."""

from __future__ import annotations

PIANO_MIN_PITCH = 21  # A0, lowest key of an 88-key piano
PIANO_MAX_PITCH = 108  # C8, highest key
MIDI_MAX_VELOCITY = 127

AUDIO_EXTENSIONS = (".wav", ".mp3", ".flac", ".ogg", ".m4a", ".aac", ".opus", ".webm", ".aiff", ".aif")
MIDI_EXTENSIONS = (".mid", ".midi")

REPORT_NAME = "report.json"  # every stage writes one beside its outputs
CONFIG_NAME = "config.json"  # the resolved config section a stage ran with
INDEX_NAME = "index.json"  # per-item cache: item id -> input key, outputs, error

# Corpora flowing through clean -> split -> tokenize.
STYLE = "style"  # the one player we imitate
BASE = "base"  # the broad symbolic corpus the base model learns from
SPLITS = ("train", "valid", "test")

SEGMENT_SEP = "__s"  # "<piece id>__s03": segment 3 of a long performance; split keeps a piece's segments together
AUG_SEP = "__a"  # "<piece id>__a<tag>": an augmented copy

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: training checkpointed and exited on SIGTERM; re-run to resume

# Set by every entry point (CLI, tests): nothing may ask a hub or phone home.
OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DVC_NO_ANALYTICS": "1",
    "TOKENIZERS_PARALLELISM": "false",
}
