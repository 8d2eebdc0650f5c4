"""Transcription speed (x realtime) and note onset F1 of Basic Pitch on rendered piano with known notes.

Reads pairs `<dir>/audio/<id>.wav` + `<dir>/scores/<id>.mid` (what `jam stage demo` writes to `data/demo`). When the
folder has none, renders a few synthetic pieces with fluidsynth into a temp dir first. Prints one JSON object.

    python bench/transcribe.py [--dir data/demo] [--limit 10] [--params params.yaml]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import mir_eval
import numpy as np
import pretty_midi
import soundfile as sf

from pipeline.core.config import load_config
from pipeline.data.transcribe import load_model, model_id, transcribe_audio

SOUNDFONT = Path("/usr/share/sounds/sf2/FluidR3_GM.sf2")
ONSET_TOLERANCE_S = 0.05  # mir_eval's default: an onset within 50 ms counts
SYNTH_PIECES = 3
SYNTH_SECONDS = 20.0


def pairs(folder: Path, limit: int | None) -> list[tuple[str, Path, Path]]:
    """(id, wav, ground-truth mid) for every id with both files, sorted."""
    found = [(w.stem, w, folder / "scores" / f"{w.stem}.mid") for w in sorted((folder / "audio").glob("*.wav"))]
    found = [p for p in found if p[2].exists()]
    return found[:limit] if limit else found


def _synthetic_piece(rng: np.random.Generator, seconds: float) -> pretty_midi.PrettyMIDI:
    """A right-hand line in eighths over left-hand triads in half notes, at a random tempo (C major-ish)."""
    bpm = float(rng.uniform(80, 140))
    beat = 60.0 / bpm
    scale = np.array([0, 2, 4, 5, 7, 9, 11])
    pm = pretty_midi.PrettyMIDI(initial_tempo=bpm)
    piano = pretty_midi.Instrument(program=0)
    t, degree = 0.0, 7
    while t < seconds - 1.0:
        degree = int(np.clip(degree + rng.integers(-2, 3), 0, 13))
        pitch = 60 + 12 * (degree // 7) + scale[degree % 7]
        dur = beat / 2 * float(rng.choice([1, 1, 2]))
        piano.notes.append(pretty_midi.Note(int(rng.integers(60, 100)), int(pitch), t, t + dur * 0.9))
        t += dur
    for bar in np.arange(0.0, seconds - 2 * beat, 2 * beat):
        root = 48 + int(rng.choice([0, 5, 7, 9]))
        for step in (0, 4, 7):
            piano.notes.append(pretty_midi.Note(int(rng.integers(50, 80)), root + step, bar, bar + 2 * beat * 0.95))
    pm.instruments.append(piano)
    return pm


def render_synthetic(folder: Path, n: int = SYNTH_PIECES, seconds: float = SYNTH_SECONDS, seed: int = 0) -> Path:
    """Write `n` synthetic pieces as `<folder>/scores/<id>.mid` and their fluidsynth renderings as `audio/<id>.wav`."""
    if not shutil.which("fluidsynth") or not SOUNDFONT.exists():
        sys.exit("no pairs found and fluidsynth / FluidR3_GM.sf2 is not installed to render some")
    rng = np.random.default_rng(seed)
    for k in range(n):
        mid, wav = folder / "scores" / f"synth{k:02d}.mid", folder / "audio" / f"synth{k:02d}.wav"
        mid.parent.mkdir(parents=True, exist_ok=True)
        wav.parent.mkdir(parents=True, exist_ok=True)
        _synthetic_piece(rng, seconds).write(str(mid))
        cmd = ["fluidsynth", "-ni", "-q", "-F", str(wav), "-r", "22050", str(SOUNDFONT), str(mid)]
        subprocess.run(cmd, check=True, capture_output=True, timeout=300)
    return folder


def onset_scores(reference: pretty_midi.PrettyMIDI, estimate: pretty_midi.PrettyMIDI) -> tuple[float, float, float]:
    """(precision, recall, F1) of note onsets with pitch, offsets ignored."""

    def arrays(pm: pretty_midi.PrettyMIDI) -> tuple[np.ndarray, np.ndarray]:
        notes = [n for inst in pm.instruments if not inst.is_drum for n in inst.notes]
        intervals = np.array([[n.start, max(n.end, n.start + 1e-3)] for n in notes]).reshape(-1, 2)
        return intervals, np.array([pretty_midi.note_number_to_hz(n.pitch) for n in notes])

    (ri, rp), (ei, ep) = arrays(reference), arrays(estimate)
    p, r, f, _ = mir_eval.transcription.precision_recall_f1_overlap(
        ri, rp, ei, ep, onset_tolerance=ONSET_TOLERANCE_S, offset_ratio=None
    )
    return float(p), float(r), float(f)


def _warm_up(wav: Path, model, tcfg) -> float:
    """Transcribe the first few seconds once so one-off start-up costs stay out of the x-realtime figure."""
    y, sr = sf.read(str(wav), frames=5 * sf.info(str(wav)).samplerate, always_2d=False)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-warmup-") as tmp:
        sf.write(str(Path(tmp) / "warmup.wav"), y, sr)
        with contextlib.suppress(RuntimeError):  # a silent opening: the warm-up still happened
            transcribe_audio(Path(tmp) / "warmup.wav", model, tcfg)
    return time.perf_counter() - t0


def bench(folder: Path, limit: int | None, params: Path, rendered: bool) -> dict:
    tcfg = load_config(params).transcribe
    t0 = time.perf_counter()
    model = load_model()
    load_s = time.perf_counter() - t0
    found = pairs(folder, limit)
    if not found:
        sys.exit(f"no <id>.wav + <id>.mid pairs under {folder}/audio and {folder}/scores")
    warmup_s = _warm_up(found[0][1], model, tcfg)
    rows, audio_s, work_s = [], 0.0, 0.0
    for item_id, wav, mid in found:
        t0 = time.perf_counter()
        est = transcribe_audio(wav, model, tcfg)
        seconds = time.perf_counter() - t0
        duration = sf.info(str(wav)).duration
        p, r, f = onset_scores(pretty_midi.PrettyMIDI(str(mid)), est)
        audio_s, work_s = audio_s + duration, work_s + seconds
        rows.append(
            {
                "id": item_id,
                "audio_s": round(duration, 2),
                "seconds": round(seconds, 3),
                "x_realtime": round(duration / seconds, 1),
                "precision": round(p, 3),
                "recall": round(r, 3),
                "onset_f1": round(f, 3),
                "tempo": round(float(est.get_tempo_changes()[1][0]), 1),
            }
        )
    return {
        "dir": str(folder) if not rendered else "<rendered synthetic pieces>",
        "model": model_id(tcfg),
        "items": len(rows),
        "model_load_s": round(load_s, 2),
        "warmup_s": round(warmup_s, 2),  # first call in a process: numba/librosa caches load; excluded below
        "audio_s": round(audio_s, 1),
        "transcribe_s": round(work_s, 2),
        "x_realtime": round(audio_s / work_s, 1),
        "onset_f1_mean": round(float(np.mean([r["onset_f1"] for r in rows])), 3),
        "onset_precision_mean": round(float(np.mean([r["precision"] for r in rows])), 3),
        "onset_recall_mean": round(float(np.mean([r["recall"] for r in rows])), 3),
        "per_item": rows,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=Path("data/demo"), help="folder with audio/ and scores/")
    parser.add_argument("--limit", type=int, default=None, help="at most this many pieces")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"), help="transcribe.* settings from here")
    args = parser.parse_args()
    if pairs(args.dir, args.limit):
        result = bench(args.dir, args.limit, args.params, rendered=False)
    else:
        with tempfile.TemporaryDirectory(prefix="bench-transcribe-") as tmp:
            result = bench(render_synthetic(Path(tmp)), args.limit, args.params, rendered=True)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
