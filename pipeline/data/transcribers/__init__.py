"""Transcriber backends behind one interface, one module each; `make_transcriber(name)` picks one.

A backend module provides `model_id(tcfg) -> str` (part of the cache key), `load_model(tcfg, threads)` (once per
worker) and `transcribe(path, model, tcfg) -> Transcription` (one audio file: notes in seconds, sustain pedal).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.core.config import ConfigError, TranscribeConfig
from pipeline.data.transcribers.base import TranscriberError, Transcription, pick_device

BACKENDS = ("basic_pitch", "transkun")

__all__ = ["BACKENDS", "Transcriber", "TranscriberError", "Transcription", "make_transcriber", "pick_device"]


@dataclass(frozen=True)
class Transcriber:
    name: str
    model_id: Callable[[TranscribeConfig], str]
    load_model: Callable[[TranscribeConfig, int | None], Any]
    transcribe: Callable[[Path, Any, TranscribeConfig], Transcription]


def make_transcriber(name: str) -> Transcriber:
    """The backend called `name` (`transcribe.backend`).

    Raises:
        ConfigError: no such backend.
    """
    if name == "basic_pitch":
        from pipeline.data.transcribers import basic_pitch as mod
    elif name == "transkun":
        from pipeline.data.transcribers import transkun as mod
    else:
        raise ConfigError(f"transcribe.backend: unknown backend {name!r}; expected one of {', '.join(BACKENDS)}")
    return Transcriber(name, mod.model_id, mod.load_model, mod.transcribe)
