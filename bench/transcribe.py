"""Transcribers side by side: speed (x realtime), note-onset F1, onset+offset F1 and pedal accuracy (mir_eval).

Two sets: `--set expressive` (default) builds performances offline (bench/performances.py: the demo's scores with
rubato, dynamics, chord spreads and sustain pedal, rendered with fluidsynth); `--set scores` reads pairs
`<dir>/audio/<id>.wav` + `<dir>/scores/<id>.mid` (what `jam stage demo` writes to `data/demo`; rendered scores:
exact timing, no pedal), rendering synthetic pieces when the folder has none. Prints one JSON object.

    python bench/transcribe.py [--set expressive|scores] [--pieces 6] [--seconds 20] [--backends basic_pitch,transkun]
        [--variant hop_s=12 --variant precision=bfloat16,batch_segments=4 --variant threads=1 ...]
        # extra Transkun settings, each measured on its own in the same process (threads=N: torch threads)
"""

from __future__ import annotations

import argparse
import json
import os
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

from pipeline.core.config import TranscribeConfig, load_config
from pipeline.data.transcribe import transcribe_audio
from pipeline.data.transcribers import make_transcriber
from pipeline.data.transcribers.pedal import extend_through_pedal, pedal_intervals

sys.path.insert(0, str(Path(__file__).parent))
import performances

SOUNDFONT = Path("/usr/share/sounds/sf2/FluidR3_GM.sf2")
ONSET_TOLERANCE_S = 0.05  # mir_eval's default: an onset within 50 ms counts
SYNTH_PIECES = 3
SYNTH_SECONDS = 20.0
PEDAL_FRAME_S = 0.01  # seconds per frame of the pedal-down accuracy


def pairs(folder: Path, limit: int | None) -> list[tuple[str, Path, Path]]:
    """(id, wav, ground-truth mid) for every id with both files, sorted."""
    audio = folder / "audio"  # the demo's: audio/<player>/<id>.wav beside scores/<player>/<id>.mid
    rels = [w.relative_to(audio).with_suffix("") for w in sorted(audio.rglob("*.wav"))]
    found = [(str(r).replace("/", "-"), audio / f"{r}.wav", folder / "scores" / f"{r}.mid") for r in rels]
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


def _arrays(notes: list[pretty_midi.Note]) -> tuple[np.ndarray, np.ndarray]:
    intervals = np.array([[n.start, max(n.end, n.start + 1e-3)] for n in notes]).reshape(-1, 2)
    return intervals, np.array([pretty_midi.note_number_to_hz(n.pitch) for n in notes])


def _f1(ref: list[pretty_midi.Note], est: list[pretty_midi.Note], offsets: bool) -> float:
    (ri, rp), (ei, ep) = _arrays(ref), _arrays(est)
    ratio = 0.2 if offsets else None  # mir_eval's default offset tolerance: 20% of the note (at least 50 ms)
    kw = {"onset_tolerance": ONSET_TOLERANCE_S, "offset_ratio": ratio}
    return float(mir_eval.transcription.precision_recall_f1_overlap(ri, rp, ei, ep, **kw)[2])


def _pedal_accuracy(ref: list, est: list, seconds: float) -> float:
    """Fraction of PEDAL_FRAME_S frames whose pedal state (down/up) the estimate gets right."""
    t = np.arange(0, seconds, PEDAL_FRAME_S)

    def down(ccs: list) -> np.ndarray:
        state = np.zeros(len(t), bool)
        for a, b in pedal_intervals(ccs):
            state |= (t >= a) & (t < b)
        return state

    return float(np.mean(down(ref) == down(est)))


def score_item(ref_pm: pretty_midi.PrettyMIDI, est_pm: pretty_midi.PrettyMIDI, seconds: float) -> dict:
    """Onset P/R/F1; onset+offset F1 against key releases and against sounding (pedal-extended) ends; pedal."""
    ref_notes = [n for i in ref_pm.instruments for n in i.notes]
    ref_pedal = [c for i in ref_pm.instruments for c in i.control_changes if c.number == 64]
    est_notes = [n for i in est_pm.instruments for n in i.notes]
    est_pedal = [c for i in est_pm.instruments for c in i.control_changes if c.number == 64]
    p, r, f = onset_scores(ref_pm, est_pm)
    row = {"precision": round(p, 3), "recall": round(r, 3), "onset_f1": round(f, 3)}
    row["onoff_f1_key_release"] = round(_f1(ref_notes, est_notes, offsets=True), 3)
    row["onoff_f1_sounding"] = round(_f1(extend_through_pedal(ref_notes, ref_pedal), est_notes, offsets=True), 3)
    if ref_pedal:
        row["pedal_accuracy"] = round(_pedal_accuracy(ref_pedal, est_pedal, seconds), 3) if est_pedal else None
    return row


def _variant(base: TranscribeConfig, backend: str, extra: str | None) -> tuple[TranscribeConfig, int | None]:
    """`base` with `k=v[,k=v]` applied; `threads=N` (torch threads for this run, not a param) is returned apart."""
    updates: dict = {"backend": backend}
    threads = None
    for pair in extra.split(",") if extra else []:
        key, value = pair.split("=")
        if key == "threads":
            threads = int(value)
            continue
        try:
            updates[key] = json.loads(value)  # numbers, true/false
        except ValueError:
            updates[key] = value  # a word: precision=bfloat16
    return base.model_copy(update=updates), threads


def _summary(label: str, model_id: str, load_s: float, rows: list[dict], audio_s: float, work_s: float) -> dict:
    means = {
        k: round(float(np.mean([r[k] for r in rows if r.get(k) is not None])), 3)
        for k in rows[0]
        if k not in ("id",) and any(r.get(k) is not None for r in rows)
    }
    head = {"label": label, "model": model_id, "model_load_s": round(load_s, 2)}
    return head | means | {"x_realtime": round(audio_s / work_s, 2), "audio_s": round(audio_s, 1), "per_item": rows}


def bench_interleaved(found: list, settings: list[tuple[str, TranscribeConfig, int | None]]) -> list[dict]:
    """Every setting on every pair, taking turns item by item, so that the load of a shared machine falls on all
    alike: models loaded and warmed up first (one-off costs stay out of x-realtime), then per-item speed and scores.
    Each setting's torch threads are set before each of its calls (threads=N; None: torch's default)."""
    import torch

    default_threads = torch.get_num_threads()
    runs = []
    for label, tcfg, threads in settings:
        transcriber = make_transcriber(tcfg.backend)
        t0 = time.perf_counter()
        model = transcriber.load_model(tcfg, threads)
        load_s = time.perf_counter() - t0
        torch.set_num_threads(threads or default_threads)
        transcribe_audio(found[0][1], model, tcfg, transcriber)  # warm-up
        runs.append({"label": label, "tcfg": tcfg, "threads": threads, "transcriber": transcriber, "model": model,
                     "load_s": load_s, "rows": [], "audio_s": 0.0, "work_s": 0.0})  # fmt: skip
    for item_id, wav, mid in found:
        duration = sf.info(str(wav)).duration
        for run in runs:
            torch.set_num_threads(run["threads"] or default_threads)
            t0 = time.perf_counter()
            est = transcribe_audio(wav, run["model"], run["tcfg"], run["transcriber"])
            seconds = time.perf_counter() - t0
            run["audio_s"], run["work_s"] = run["audio_s"] + duration, run["work_s"] + seconds
            row = {"id": item_id, "x_realtime": round(duration / seconds, 2)}
            run["rows"].append(row | score_item(pretty_midi.PrettyMIDI(str(mid)), est, duration))
    torch.set_num_threads(default_threads)
    return [
        _summary(r["label"], r["transcriber"].model_id(r["tcfg"]), r["load_s"], r["rows"], r["audio_s"], r["work_s"])
        for r in runs
    ]


def bench(folder: Path, args: argparse.Namespace, described: str) -> dict:
    import torch

    base = load_config(args.params).transcribe
    found = pairs(folder, args.pieces)
    if not found:
        sys.exit(f"no <id>.wav + <id>.mid pairs under {folder}/audio and {folder}/scores")
    settings = []
    for backend in args.backends.split(","):
        settings.append((backend, *_variant(base, backend, None)))
        if backend == "transkun":
            settings += [(f"transkun {v}", *_variant(base, backend, v)) for v in args.variant]
    load_before = Path("/proc/loadavg").read_text().split()[:3]
    runs = bench_interleaved(found, settings)
    machine = {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "cuda": torch.cuda.is_available()}
    machine["loadavg_1_5_15min"] = {"before": load_before, "after": Path("/proc/loadavg").read_text().split()[:3]}
    return {"set": described, "items": len(found), "machine": machine, "runs": runs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--set", choices=("expressive", "scores"), default="expressive")
    parser.add_argument("--dir", type=Path, default=Path("data/demo"), help="scores set: folder with audio/, scores/")
    parser.add_argument("--pieces", type=int, default=6, help="at most this many pieces")
    parser.add_argument("--seconds", type=float, default=20.0, help="expressive set: seconds per piece")
    parser.add_argument("--backends", default="basic_pitch,transkun")
    parser.add_argument("--variant", action="append", default=[], help="extra transkun settings: k=v[,k=v]")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"), help="transcribe.* settings from here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-transcribe-") as tmp:
        if args.set == "expressive":
            folder = performances.build(Path(tmp), args.pieces, args.seconds)
            result = bench(folder, args, f"expressive: {args.pieces} x {args.seconds} s performances")
        elif pairs(args.dir, args.pieces):
            result = bench(args.dir, args, f"rendered scores in {args.dir}")
        else:
            result = bench(render_synthetic(Path(tmp)), args, "rendered synthetic pieces")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
