"""The beat a listener (librosa's beat tracker) hears: the tokenizer's time grid for recordings and performed scores.

A transcription has no score, so its beat is the tracker's global tempo, folded into TEMPO_RANGE_BPM. A base
corpus piece performed from a score (`base.perform`) gets its beat the same way, from its notes' onsets, so both
corpora count time in the same kind of beat: the pulse heard, not the note value a score happens to be written in
(a Palestrina mass in half and whole notes reads as 2-4 "beats" a note; heard, its tactus is the beat).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import numpy as np

log = logging.getLogger(__name__)

TEMPO_RANGE_BPM = (60.0, 180.0)  # estimates outside are folded in by octaves (beat trackers halve/double)
TEMPO_SAMPLE_RATE = 22050  # Hz, for beat tracking
ONSET_HOP = 512  # samples per onset-envelope frame (librosa's default hop: ~43 frames a second)


def fold_tempo(bpm: float, default: float) -> float:
    """Fold a tempo into `TEMPO_RANGE_BPM` by octaves (300 -> 150, 40 -> 80); `default` if not a positive number."""
    if not np.isfinite(bpm) or bpm <= 0:
        return default
    low, high = TEMPO_RANGE_BPM
    while bpm < low:
        bpm *= 2
    while bpm > high:
        bpm /= 2
    return round(bpm, 2)


def _tracked(envelope: np.ndarray, default: float) -> float:
    """Tempo of an onset-strength envelope (TEMPO_SAMPLE_RATE / ONSET_HOP frames), folded; `default` without onsets.

    librosa.feature.tempo is the estimate beat_track returns, without beat_track's numba-compiled beat placement
    (not needed here): two worker processes compiling that into librosa's shared numba cache at once left a corrupt
    cache on a fresh install, after which every call segfaulted.
    """
    import librosa

    if not np.any(envelope):  # beat_track's rule: no onsets, no tempo
        return default
    try:
        tempo = librosa.feature.tempo(onset_envelope=envelope, sr=TEMPO_SAMPLE_RATE, hop_length=ONSET_HOP)
        bpm = float(np.atleast_1d(tempo)[0])
    except Exception as err:  # librosa raises ParameterError and others on degenerate input
        log.debug("tempo estimation failed: %s", err)
        return default
    return fold_tempo(bpm, default)


def estimate_tempo(audio: np.ndarray, sr: int, default: float) -> float:
    """Global tempo in BPM of audio by librosa's beat tracker, folded into `TEMPO_RANGE_BPM`; `default` if it fails."""
    import librosa

    if sr != TEMPO_SAMPLE_RATE:
        audio = librosa.resample(audio, orig_sr=sr, target_sr=TEMPO_SAMPLE_RATE)
    try:
        envelope = librosa.onset.onset_strength(y=audio, sr=TEMPO_SAMPLE_RATE, hop_length=ONSET_HOP)
    except Exception as err:
        log.debug("onset strength failed: %s", err)
        return default
    return _tracked(envelope, default)


def notes_tempo(onsets_s: Iterable[float], weights: Iterable[float], default: float) -> float:
    """The same tracker on an onset envelope made of the notes (an impulse per onset, weighted by loudness)."""
    onsets, w = np.asarray(list(onsets_s), float), np.asarray(list(weights), float)
    if len(onsets) < 2:
        return default
    frames = np.round(onsets * TEMPO_SAMPLE_RATE / ONSET_HOP).astype(int)
    envelope = np.zeros(frames.max() + 1, np.float32)
    np.add.at(envelope, frames, w)
    return _tracked(envelope, default)
