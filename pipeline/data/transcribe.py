"""Transcribe: acquired audio -> piano MIDI with Basic Pitch (its shipped ONNX model); MIDI sources pass through.

Reads `data/acquire/manifest.jsonl`, writes `data/transcribe/midi/<id>.mid` (one piano track, program 0). Items are
cached by (input sha256, transcription params, model id): a re-run transcribes nothing, a new source only itself.
The model is loaded once per worker process; files run in parallel across `project.workers` processes.
"""

from __future__ import annotations

import importlib.metadata
import logging
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pretty_midi

from pipeline.core import constants as C
from pipeline.core.config import Config, TranscribeConfig, section_json
from pipeline.core.files import sha256_file, sha256_text
from pipeline.core.items import (
    ItemError,
    ItemIndex,
    ItemResult,
    Job,
    StageReport,
    TransientError,
    count_outputs,
    raise_if_all_failed,
    run_jobs,
)
from pipeline.core.midi import merge_piano, save_midi
from pipeline.data.acquire.manifest import read_manifest

log = logging.getLogger(__name__)

STAGE_VERSION = "transcribe-1"
TEMPO_RANGE_BPM = (60.0, 180.0)  # estimates outside are folded in by octaves (beat trackers halve/double)
MIDI_RESOLUTION = 480  # ticks per beat of the written files
BATCH_WINDOWS = 4  # Basic Pitch windows (~2 s of audio each) per ONNX call
OVERLAP_FRAMES = 30  # Basic Pitch's own window overlap, in model frames
NO_NOTES = "no notes detected — silent or non-piano audio?"

_MODEL: Any = None  # this process's Basic Pitch model, loaded on its first audio item
_THREADS: int | None = None  # onnxruntime intra-op threads of this process (set by `_init_worker`)


class TranscribeError(ItemError):
    """An item that cannot be transcribed; the message is one clear line for the report."""


@contextmanager
def _quiet_import():
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


def load_model(threads: int | None = None) -> Any:
    """Basic Pitch's shipped ICASSP 2022 model on onnxruntime's CPU provider.

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


def estimate_tempo(audio: np.ndarray, sr: int, default: float) -> float:
    """Global tempo in BPM by librosa beat tracking, folded into `TEMPO_RANGE_BPM`; `default` if it fails."""
    import librosa

    try:
        tempo, _ = librosa.beat.beat_track(y=audio, sr=sr)
        bpm = float(np.atleast_1d(tempo)[0])
    except Exception as err:  # librosa raises ParameterError and others on degenerate input
        log.debug("tempo estimation failed: %s", err)
        return default
    return fold_tempo(bpm, default)


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


def _piano_midi(notes: list[pretty_midi.Note], tempo: float) -> pretty_midi.PrettyMIDI:
    pm = pretty_midi.PrettyMIDI(resolution=MIDI_RESOLUTION, initial_tempo=tempo)
    piano = pretty_midi.Instrument(program=0, name="Piano")
    piano.notes = sorted(notes, key=lambda n: (n.start, n.pitch))
    pm.instruments.append(piano)
    return pm


def transcribe_audio(path: Path | str, model: Any, tcfg: TranscribeConfig) -> pretty_midi.PrettyMIDI:
    """Transcribe one audio file to a single-piano MIDI (notes at their times in seconds).

    Args:
        path: any audio librosa reads (acquire stores mono WAV).
        model: from `load_model`.
        tcfg: thresholds, minimum note length, pitch range, melodia trick, tempo options.

    Returns:
        The MIDI, with the estimated (or default) tempo as its initial tempo.

    Raises:
        TranscribeError: the audio decodes to nothing or no notes are detected.
    """
    import librosa

    with _quiet_import():
        from basic_pitch.constants import AUDIO_SAMPLE_RATE, FFT_HOP
        from basic_pitch.note_creation import model_output_to_notes

    audio, _ = librosa.load(str(path), sr=AUDIO_SAMPLE_RATE, mono=True)
    if audio.size == 0:
        raise TranscribeError("audio decodes to nothing (0 samples)")
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
        pretty_midi.Note(
            velocity=int(np.clip(round(127 * amp), 1, C.MIDI_MAX_VELOCITY)),
            pitch=int(pitch),
            start=float(start),
            end=float(end),
        )
        for start, end, pitch, amp, _ in events
        if tcfg.min_pitch <= pitch <= tcfg.max_pitch and end > start
    ]
    if not notes:
        raise TranscribeError(NO_NOTES)
    tempo = estimate_tempo(audio, AUDIO_SAMPLE_RATE, tcfg.default_tempo) if tcfg.estimate_tempo else tcfg.default_tempo
    return _piano_midi(notes, tempo)


def normalize_midi(path: Path | str) -> pretty_midi.PrettyMIDI:
    """A MIDI source as one piano track (`merge_piano`: non-drum notes and sustain pedal; tempo map, meter kept).

    Raises:
        TranscribeError: no non-drum notes.
    """
    pm = merge_piano(pretty_midi.PrettyMIDI(str(path)))
    if not pm.instruments[0].notes:
        raise TranscribeError("MIDI has no (non-drum) notes")
    return pm


# --- per item and driver ------------------------------------------------------------------------------------------


def _init_worker(threads: int | None) -> None:
    """`run_jobs` initializer: this process's onnxruntime thread budget; the model loads on its first audio item."""
    global _THREADS
    _THREADS = threads


def _model() -> Any:
    global _MODEL
    if _MODEL is None:
        _MODEL = load_model(_THREADS)
    return _MODEL


def transcribe_item(src: Path, kind: str, tcfg: TranscribeConfig, dest: Path) -> ItemResult:
    """Transcribe (or pass through) one acquired item and write its MIDI to `dest` (`midi/<id>.mid`).

    Raises:
        TransientError: the input is missing (not cached as a failure: acquire may bring the same file back).
        TranscribeError: nothing to transcribe.
    """
    t0 = time.perf_counter()
    if not src.exists():
        raise TransientError(f"input missing: {src}")
    if kind == "midi":
        pm, audio_s = normalize_midi(src), 0.0
    else:
        pm, audio_s = transcribe_audio(src, _model(), tcfg), _audio_seconds(src)
    save_midi(pm, dest)
    tempi = pm.get_tempo_changes()[1]
    stats = {
        "notes": sum(len(i.notes) for i in pm.instruments),
        "audio_s": audio_s,  # seconds of audio (0 for MIDI)
        "seconds": time.perf_counter() - t0,  # work time of this item
        "tempo": round(float(tempi[0]), 2) if len(tempi) else None,  # BPM
    }
    return ItemResult(outputs=[f"midi/{dest.name}"], stats=stats)


def _audio_seconds(path: Path) -> float:
    import soundfile as sf

    try:
        return float(sf.info(str(path)).duration)
    except Exception:  # not a soundfile format (mp3 via audioread): the figure is only for the report
        return 0.0


def _job(row: dict[str, Any], cfg: Config, in_dir: Path, out_dir: Path) -> Job:
    kind = row.get("kind", "audio")
    src = in_dir / ("midi" if kind == "midi" else "audio") / f"{row['id']}{'.mid' if kind == 'midi' else '.wav'}"
    sha = row.get("sha256") or (sha256_file(src) if src.exists() else "missing")
    if kind == "midi":
        key = sha256_text(sha, "midi-passthrough", STAGE_VERSION)
    else:
        key = sha256_text(sha, section_json(cfg.transcribe), model_id(cfg.transcribe), STAGE_VERSION)
    dest = out_dir / "midi" / f"{row['id']}.mid"
    return Job(row["id"], key, transcribe_item, (src, kind, cfg.transcribe, dest))


def _stats(done: list[dict[str, Any]], ids: list[str], wall_s: float) -> dict[str, Any]:
    audio_s = sum(d["audio_s"] for d in done)
    work_s = sum(d["seconds"] for d in done if d["audio_s"] > 0)
    return {
        "audio_s": round(audio_s, 2),  # seconds of audio transcribed this run
        "transcribe_s": round(wall_s, 2),  # wall time of the transcription phase
        "x_realtime": round(audio_s / wall_s, 2) if wall_s > 0 and audio_s > 0 else None,  # throughput
        "x_realtime_per_worker": round(audio_s / work_s, 2) if work_s > 0 else None,
        "notes_per_item": {i: d["notes"] for i, d in zip(ids, done, strict=True)},
        "tempo_per_item": {i: d["tempo"] for i, d in zip(ids, done, strict=True)},
    }


def run_transcribe(cfg: Config, inputs: dict[str, Path], out_dir: Path) -> StageReport:
    """Transcribe every acquired item (cached per item) into `data/transcribe/midi/`.

    Args:
        cfg: the project config (`cfg.transcribe`, `cfg.project.workers`).

    Returns:
        The stage report (also written to `data/transcribe/report.json`).

    Raises:
        AllItemsFailed: every item failed.
    """
    in_dir = inputs["acquire"]
    out_dir.mkdir(parents=True, exist_ok=True)
    report = StageReport(stage="transcribe")
    index = ItemIndex(out_dir / C.INDEX_NAME)
    rows = list(read_manifest(in_dir).values())
    t0 = time.perf_counter()
    jobs = [_job(row, cfg, in_dir, out_dir) for row in rows]
    run_jobs(jobs, index, out_dir, report, cfg.project.workers, initializer=_init_worker)
    report.processed.sort()
    done = [index.entries[i]["stats"] for i in report.processed]
    report.stats = _stats(done, report.processed, time.perf_counter() - t0)
    report.stats["pruned"] = index.prune({r["id"] for r in rows}, out_dir)
    report.outputs = count_outputs(index, report.processed + report.cached)
    report.finish(out_dir, section_json(cfg.transcribe))
    raise_if_all_failed(report)
    return report
