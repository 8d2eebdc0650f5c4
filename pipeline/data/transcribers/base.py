"""What every transcriber backend shares: its result type, its error, device choice, input checks."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pretty_midi

from pipeline.core import constants as C
from pipeline.core.config import ConfigError
from pipeline.core.items import ItemError


class TranscriberError(ItemError):
    """An item that cannot be transcribed; the message is one clear line for the report."""


@dataclass
class Transcription:
    """One recording's notes (seconds, MIDI velocity) and sustain-pedal changes (CC64; empty if not modelled)."""

    notes: list[pretty_midi.Note]
    pedal: list[pretty_midi.ControlChange] = field(default_factory=list)


def pick_device(device: str) -> str:
    """`transcribe.device` resolved: auto = CUDA when torch sees a GPU, else CPU.

    Raises:
        ConfigError: cuda asked for but absent.
    """
    if device == "cpu":
        return "cpu"
    import torch

    if torch.cuda.is_available():
        return "cuda"
    if device == "cuda":
        raise ConfigError(
            f"transcribe.device: cuda asked for but torch {torch.__version__} sees no GPU; use auto or cpu"
        )
    return "cpu"


def check_duration(path: Path | str, min_s: float) -> float:
    """Seconds of audio in `path` (soundfile formats; acquire writes WAV).

    Raises:
        TranscriberError: unreadable, or shorter than `min_s`.
    """
    import soundfile as sf

    try:
        seconds = float(sf.info(str(path)).duration)
    except Exception as err:  # soundfile raises RuntimeError / LibsndfileError on undecodable files
        raise TranscriberError(f"audio unreadable: {err}") from err
    if seconds < min_s:
        raise TranscriberError(f"audio too short: {seconds:.2f} s (transcribe.min_audio_s = {min_s} s)")
    return seconds


def to_midi_velocity(value: float) -> int:
    return int(np.clip(round(value), 1, C.MIDI_MAX_VELOCITY))
