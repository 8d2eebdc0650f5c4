"""Rendering MIDI to audio with fluidsynth: the demo's piano recordings and evaluation's listenable samples."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import soundfile as sf

FLUIDSYNTH = "fluidsynth"
FLUIDSYNTH_TIMEOUT_S = 120  # seconds; a 30 s excerpt renders in well under one


def fluidsynth_missing(soundfont: Path) -> str | None:
    """What is missing to render with fluidsynth (the binary or the soundfont), or None when both are there."""
    if not shutil.which(FLUIDSYNTH):
        return FLUIDSYNTH
    return None if Path(soundfont).is_file() else f"soundfont {soundfont}"


def render_fluidsynth(midi_path: Path, soundfont: Path, sample_rate: int, duration_s: float) -> np.ndarray:
    """Render a MIDI file with fluidsynth; returns mono float32 audio cut to `duration_s` seconds."""
    with tempfile.TemporaryDirectory(prefix="jam-render-") as tmp_dir:
        tmp = Path(tmp_dir) / "render.wav"
        cmd = [FLUIDSYNTH, "-ni", "-q", "-T", "wav", "-F", str(tmp), "-r", str(sample_rate), str(soundfont)]
        proc = subprocess.run([*cmd, str(midi_path)], capture_output=True, text=True, timeout=FLUIDSYNTH_TIMEOUT_S)
        if proc.returncode != 0 or not tmp.is_file() or tmp.stat().st_size == 0:
            raise RuntimeError(f"fluidsynth failed (rc {proc.returncode}): {proc.stderr.strip()[-300:]}")
        audio, _ = sf.read(str(tmp), dtype="float32", always_2d=True)
    return audio.mean(axis=1)[: round(duration_s * sample_rate)]
