"""Transcribe: acquired audio -> piano MIDI with the `transcribe.backend` transcriber; MIDI sources pass through.

Reads `data/acquire/manifest.jsonl`, writes `data/transcribe/midi/<id>.mid` (one piano track, program 0, with the
sustain pedal as CC64 when the backend detects it). Items are cached by (input sha256, transcription params, backend
model id): a re-run transcribes nothing, a new source only itself. The model is loaded once per worker process
(`run_jobs`' initializer; on a Dask cluster, once per worker); files run in parallel across `project.workers`
processes, or a Dask cluster's workers (`project.executor: dask`).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import pretty_midi

from pipeline.core import constants as C
from pipeline.core.config import Config, TranscribeConfig, section_json
from pipeline.core.files import sha256_file, sha256_text
from pipeline.core.items import (
    ItemIndex,
    ItemResult,
    Job,
    StageReport,
    TransientError,
    count_outputs,
    raise_if_all_failed,
    run_jobs,
)
from pipeline.core.midi import SUSTAIN_CC, merge_piano, save_midi
from pipeline.data.acquire.manifest import read_manifest
from pipeline.data.tempo import TEMPO_SAMPLE_RATE, estimate_tempo
from pipeline.data.transcribers import Transcriber, TranscriberError, make_transcriber, pick_device
from pipeline.data.transcribers.pedal import extend_through_pedal

log = logging.getLogger(__name__)

STAGE_VERSION = "transcribe-2"  # 2: backends, sustain pedal
MIDI_RESOLUTION = 480  # ticks per beat of the written files
TEMPO_WINDOW_S = 120.0  # seconds of audio the tempo is estimated from (bounded memory on long recordings)
NO_NOTES = "no notes detected — silent or non-piano audio?"

TranscribeError = TranscriberError  # the stage's per-item error (kept under its old name)

_WORKER: dict[str, Any] = {}  # backend -> this process's (transcriber, model or the error loading it); threads


def _piano_midi(
    notes: list[pretty_midi.Note], pedal: list[pretty_midi.ControlChange], tempo: float
) -> pretty_midi.PrettyMIDI:
    pm = pretty_midi.PrettyMIDI(resolution=MIDI_RESOLUTION, initial_tempo=tempo)
    piano = pretty_midi.Instrument(program=0, name="Piano")
    piano.notes = sorted(notes, key=lambda n: (n.start, n.pitch))
    piano.control_changes = sorted(pedal, key=lambda c: c.time)
    pm.instruments.append(piano)
    return pm


def _tempo(path: Path | str, tcfg: TranscribeConfig) -> float:
    if not tcfg.estimate_tempo:
        return tcfg.default_tempo
    import librosa

    audio, sr = librosa.load(str(path), sr=TEMPO_SAMPLE_RATE, mono=True, duration=TEMPO_WINDOW_S)
    return estimate_tempo(audio, sr, tcfg.default_tempo)


def transcribe_audio(
    path: Path | str, model: Any, tcfg: TranscribeConfig, transcriber: Transcriber | None = None
) -> pretty_midi.PrettyMIDI:
    """Transcribe one audio file to a single-piano MIDI (notes at their times in seconds, sustain pedal as CC64).

    Args:
        path: a soundfile-readable file (acquire stores mono WAV).
        model: from `transcriber.load_model`.
        tcfg: backend, thresholds, pitch range, note ends, tempo options.
        transcriber: the backend (default: `make_transcriber(tcfg.backend)`).

    Returns:
        The MIDI, with the estimated (or default) tempo as its initial tempo.

    Raises:
        TranscribeError: unreadable or too short audio, or no notes detected.
    """
    transcriber = transcriber or make_transcriber(tcfg.backend)
    result = transcriber.transcribe(Path(path), model, tcfg)
    notes = result.notes
    if tcfg.note_ends == "sounding":
        notes = extend_through_pedal(notes, result.pedal)
    if not notes:
        raise TranscribeError(NO_NOTES)
    return _piano_midi(notes, result.pedal, _tempo(path, tcfg))


def normalize_midi(path: Path | str, tcfg: TranscribeConfig | None = None) -> pretty_midi.PrettyMIDI:
    """A MIDI source as one piano track (`merge_piano`: non-drum notes and sustain pedal; tempo map, meter kept),
    notes held through the pedal when `note_ends` is sounding (the same offsets as transcribed audio).

    Raises:
        TranscribeError: no non-drum notes.
    """
    pm = merge_piano(pretty_midi.PrettyMIDI(str(path)))
    piano = pm.instruments[0]
    if not piano.notes:
        raise TranscribeError("MIDI has no (non-drum) notes")
    if tcfg is not None and tcfg.note_ends == "sounding":
        pedal = [cc for cc in piano.control_changes if cc.number == SUSTAIN_CC]
        piano.notes = extend_through_pedal(piano.notes, pedal)
    return pm


# --- per item and driver ------------------------------------------------------------------------------------------


def _load(tcfg: TranscribeConfig) -> None:
    """This process's model of `tcfg.backend`, loaded once; a load error is kept and reported per item as transient
    (a fixed install transcribes them next run, nothing is cached meanwhile)."""
    transcriber = make_transcriber(tcfg.backend)
    try:
        model: Any = transcriber.load_model(tcfg, _WORKER.get("threads"))
    except TranscriberError as err:
        model = err
    _WORKER[tcfg.backend] = (transcriber, model)


def _init_worker(threads: int | None, tcfgs: tuple[TranscribeConfig, ...]) -> None:
    """`run_jobs` initializer: the models of the backends this run's audio needs, loaded once per process."""
    _WORKER.clear()
    _WORKER["threads"] = threads
    for tcfg in tcfgs:
        _load(tcfg)


def _model(tcfg: TranscribeConfig) -> tuple[Transcriber, Any]:
    if tcfg.backend not in _WORKER:  # called without the driver (tests, notebooks), or a backend not preloaded
        _load(tcfg)
    transcriber, model = _WORKER[tcfg.backend]
    if isinstance(model, TranscriberError):
        raise TransientError(str(model))
    return transcriber, model


def style_transcribe(cfg: Config, style: str | None) -> TranscribeConfig:
    """`transcribe` as one style's audio gets it: with the style's own backend when it names one."""
    own = cfg.styles[style].transcriber if style in cfg.styles else None
    if own in (None, cfg.transcribe.backend):
        return cfg.transcribe
    return cfg.transcribe.model_copy(update={"backend": own})


def transcribe_item(src: Path, kind: str, tcfg: TranscribeConfig, dest: Path) -> ItemResult:
    """Transcribe (or pass through) one acquired item and write its MIDI to `dest` (`midi/<id>.mid`).

    Raises:
        TransientError: the input is missing (not cached as a failure: acquire may bring the same file back), or
            the model failed to load.
        TranscribeError: nothing to transcribe.
    """
    t0 = time.perf_counter()
    if not src.exists():
        raise TransientError(f"input missing: {src}")
    if kind == "midi":
        pm, audio_s = normalize_midi(src, tcfg), 0.0
    else:
        transcriber, model = _model(tcfg)
        pm, audio_s = transcribe_audio(src, model, tcfg, transcriber), _audio_seconds(src)
    save_midi(pm, dest)
    tempi = pm.get_tempo_changes()[1]
    stats = {
        "notes": sum(len(i.notes) for i in pm.instruments),
        "pedal_changes": sum(len(i.control_changes) for i in pm.instruments),
        "audio_s": audio_s,  # seconds of audio (0 for MIDI)
        "seconds": time.perf_counter() - t0,  # work time of this item
        "tempo": round(float(tempi[0]), 2) if len(tempi) else None,  # BPM
    }
    return ItemResult(outputs=[f"midi/{dest.name}"], stats=stats)


def _audio_seconds(path: Path) -> float:
    import soundfile as sf

    try:
        return float(sf.info(str(path)).duration)
    except Exception:  # not a soundfile format: the figure is only for the report
        return 0.0


def _job(row: dict[str, Any], cfg: Config, in_dir: Path, out_dir: Path) -> Job:
    kind = row.get("kind", "audio")
    src = in_dir / ("midi" if kind == "midi" else "audio") / f"{row['id']}{'.mid' if kind == 'midi' else '.wav'}"
    sha = row.get("sha256") or (sha256_file(src) if src.exists() else "missing")
    tcfg = style_transcribe(cfg, row.get("style"))
    if kind == "midi":
        key = sha256_text(sha, "midi-passthrough", tcfg.note_ends, STAGE_VERSION)
    else:
        key = sha256_text(sha, section_json(tcfg), make_transcriber(tcfg.backend).model_id(tcfg), STAGE_VERSION)
    dest = out_dir / "midi" / f"{row['id']}.mid"
    return Job(row["id"], key, transcribe_item, (src, kind, tcfg, dest))


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
        ConfigError: `transcribe.device` is cuda and torch sees no GPU.
        AllItemsFailed: every item failed.
    """
    in_dir = inputs["acquire"]
    pick_device(cfg.transcribe.device)  # CUDA asked for but absent: fail before any work
    out_dir.mkdir(parents=True, exist_ok=True)
    report = StageReport(stage="transcribe")
    index = ItemIndex(out_dir / C.INDEX_NAME)
    rows = list(read_manifest(in_dir).values())
    t0 = time.perf_counter()
    jobs = [_job(row, cfg, in_dir, out_dir) for row in rows]
    todo = [job.args[2] for job in jobs if job.args[1] != "midi" and index.fresh(job.item_id, job.key, out_dir) is None]
    init = (tuple({tcfg.backend: tcfg for tcfg in todo}.values()),)  # the backends audio still to do needs
    run_jobs(jobs, index, out_dir, report, cfg.project, initializer=_init_worker, initargs=init)
    report.processed.sort()
    done = [index.entries[i]["stats"] for i in report.processed]
    report.stats = _stats(done, report.processed, time.perf_counter() - t0)
    report.stats["pruned"] = index.prune({r["id"] for r in rows}, out_dir)
    report.outputs = count_outputs(index, report.processed + report.cached)
    report.finish(out_dir, section_json(cfg.transcribe))
    raise_if_all_failed(report)
    return report
