"""Basic Pitch (Spotify, ICASSP 2022; instrument-agnostic) through its shipped ONNX model on onnxruntime's CPU.

It does not model the sustain pedal: its notes end when the sound fades below `frame_threshold`.
"""

from __future__ import annotations

import importlib.metadata
import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pretty_midi

from pipeline.core.config import TranscribeConfig
from pipeline.data.transcribers.base import Transcription, check_duration, to_midi_velocity

BATCH_WINDOWS = 4  # Basic Pitch windows (~2 s of audio each) per ONNX call
OVERLAP_FRAMES = 30  # Basic Pitch's own window overlap, in model frames


@contextmanager
def _quiet_import() -> Iterator[None]:
    """basic_pitch logs a warning per missing backend (TF, CoreML, TFLite) at import; keep them out of the logs."""
    root, guard, previous = logging.getLogger(), logging.NullHandler(), logging.root.manager.disable
    root.addHandler(guard)  # logging.warning() would otherwise install a stderr handler on the root logger
    logging.disable(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="pkg_resources is deprecated")  # resampy, via basic_pitch
            yield
    finally:
        logging.disable(previous)
        root.removeHandler(guard)


def model_id(tcfg: TranscribeConfig) -> str:
    """Names the model weights and post-processing code: part of every cache key."""
    return f"{tcfg.model}/nmp.onnx/basic-pitch=={importlib.metadata.version('basic-pitch')}"


def load_model(tcfg: TranscribeConfig | None = None, threads: int | None = None) -> Any:
    """Basic Pitch's shipped model on onnxruntime's CPU provider (`transcribe.device` does not apply).

    Args:
        threads: onnxruntime intra-op threads (None: its default, one per physical core).

    Returns:
        A `basic_pitch.inference.Model`.
    """
    with _quiet_import():
        import onnxruntime as ort
        from basic_pitch import ICASSP_2022_MODEL_PATH
        from basic_pitch.inference import Model

    model = Model(ICASSP_2022_MODEL_PATH)
    if threads:
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        model.model = ort.InferenceSession(str(ICASSP_2022_MODEL_PATH), opts, providers=["CPUExecutionProvider"])
    return model


def _infer(audio: np.ndarray, model: Any) -> dict[str, np.ndarray]:
    """Basic Pitch's `run_inference` on an in-memory signal, batching windows. Returns (frames, bins) arrays."""
    with _quiet_import():
        from basic_pitch.constants import AUDIO_N_SAMPLES, FFT_HOP
        from basic_pitch.inference import unwrap_output, window_audio_file

    overlap = OVERLAP_FRAMES * FFT_HOP  # samples
    padded = np.concatenate([np.zeros(overlap // 2, dtype=np.float32), audio])
    out: dict[str, list[np.ndarray]] = {"note": [], "onset": [], "contour": []}
    windows = [w for w, _ in window_audio_file(padded, AUDIO_N_SAMPLES - overlap)]  # each (AUDIO_N_SAMPLES, 1)
    for i in range(0, len(windows), BATCH_WINDOWS):
        for key, value in model.predict(np.stack(windows[i : i + BATCH_WINDOWS])).items():
            out[key].append(value)
    return {k: unwrap_output(np.concatenate(v), len(audio), OVERLAP_FRAMES) for k, v in out.items()}


def transcribe(path: Path | str, model: Any, tcfg: TranscribeConfig) -> Transcription:
    """One audio file -> piano notes (sounding offsets, velocity from amplitude); no pedal.

    Raises:
        TranscriberError: unreadable or shorter than `transcribe.min_audio_s`.
    """
    import librosa

    with _quiet_import():
        from basic_pitch.constants import AUDIO_SAMPLE_RATE, FFT_HOP
        from basic_pitch.note_creation import model_output_to_notes

    check_duration(path, tcfg.min_audio_s)
    audio, _ = librosa.load(str(path), sr=AUDIO_SAMPLE_RATE, mono=True)
    frames_per_s = AUDIO_SAMPLE_RATE / FFT_HOP
    _, events = model_output_to_notes(
        _infer(audio, model),
        onset_thresh=tcfg.onset_threshold,
        frame_thresh=tcfg.frame_threshold,
        min_note_len=max(1, round(tcfg.minimum_note_length_ms / 1000 * frames_per_s)),
        min_freq=float(librosa.midi_to_hz(tcfg.min_pitch - 0.5)),
        max_freq=float(librosa.midi_to_hz(tcfg.max_pitch + 0.5)),
        include_pitch_bends=False,
        melodia_trick=tcfg.melodia_trick,
    )
    notes = [
        pretty_midi.Note(velocity=to_midi_velocity(127 * amp), pitch=int(pitch), start=float(start), end=float(end))
        for start, end, pitch, amp, _ in events
        if tcfg.min_pitch <= pitch <= tcfg.max_pitch and end > start
    ]
    return Transcription(notes)
