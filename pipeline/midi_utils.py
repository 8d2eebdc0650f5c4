"""MIDI helpers shared by the symbolic stages (demo, base, clean, augment), plus their common per-item driver loop.

Everything here speaks pretty_midi (seconds) except augment, which needs symusic for miditok. A "piano track" is
one non-drum instrument, program 0, notes sorted by onset with no overlapping notes of the same pitch.
"""

from __future__ import annotations

import copy
import multiprocessing
import os
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pretty_midi
from tqdm import tqdm

from pipeline import constants as C
from pipeline.files import ItemIndex, StageReport, atomic_path

PIANO_PROGRAM = 0  # GM Acoustic Grand Piano
DEFAULT_TEMPO_BPM = 120.0  # MIDI's own default; used when a source has no tempo
TICKS_PER_QUARTER = 480  # resolution of MIDI files we create (pretty_midi's 220 is coarse for 1/32 triplets)
MIN_NOTE_S = 1e-3  # seconds; shorter notes (after overlap trimming) cannot be written meaningfully


class MidiError(ValueError):
    """A MIDI file that cannot be read, or holds nothing usable."""


def load_midi(path: Path | str) -> pretty_midi.PrettyMIDI:
    """Read a MIDI file, turning every parser failure into one clear `MidiError`.

    Args:
        path: the .mid/.midi file.

    Returns:
        The parsed file (times in seconds, tempo map kept).
    """
    try:
        return pretty_midi.PrettyMIDI(str(path))
    except Exception as err:  # pretty_midi/mido raise OSError, EOFError, KeyError, ValueError... on bad bytes
        raise MidiError(f"unreadable MIDI ({type(err).__name__}: {err})".replace("\n", " ")) from None


def fix_overlaps(notes: Iterable[pretty_midi.Note]) -> list[pretty_midi.Note]:
    """Sort notes and make same-pitch notes non-overlapping (a piano key sounds once at a time).

    Two notes of one pitch starting together (unisons of merged parts) keep the louder, longer one; a note still
    sounding when the same pitch starts again is cut at that onset.

    Args:
        notes: notes from any number of instruments.

    Returns:
        New list of copied notes sorted by (start, pitch).
    """
    ordered = sorted(notes, key=lambda n: (n.start, n.pitch, -n.velocity, -n.end))
    out: list[pretty_midi.Note] = []
    last: dict[int, pretty_midi.Note] = {}
    for note in ordered:
        prev = last.get(note.pitch)
        if prev is not None and note.start - prev.start < MIN_NOTE_S:
            prev.end = max(prev.end, note.end)  # unison duplicate: merge into the first
            continue
        if prev is not None and prev.end > note.start:
            prev.end = note.start
        fresh = pretty_midi.Note(note.velocity, note.pitch, note.start, note.end)
        out.append(fresh)
        last[note.pitch] = fresh
    return [n for n in out if n.end - n.start >= MIN_NOTE_S]


def piano_notes(pm: pretty_midi.PrettyMIDI) -> list[pretty_midi.Note]:
    """All non-drum notes of a file as one piano part (see `fix_overlaps`)."""
    return fix_overlaps(n for inst in pm.instruments if not inst.is_drum for n in inst.notes)


def with_notes(
    pm: pretty_midi.PrettyMIDI, notes: list[pretty_midi.Note], program: int = PIANO_PROGRAM
) -> pretty_midi.PrettyMIDI:
    """A copy of `pm` (tempo map, time signatures kept) whose only instrument is a piano holding `notes`.

    Sustain-pedal and other control changes of the first non-drum instrument are kept: transcriptions and
    piano MIDI carry their pedalling there.
    """
    out = copy.copy(pm)
    melodic = [inst for inst in pm.instruments if not inst.is_drum]
    piano = pretty_midi.Instrument(program=program, name="Piano")
    piano.notes = list(notes)
    if melodic:
        piano.control_changes = list(melodic[0].control_changes)
    out.instruments = [piano]
    out.lyrics, out.text_events = [], []
    return out


def notes_to_midi(
    notes: list[pretty_midi.Note], tempo_bpm: float = DEFAULT_TEMPO_BPM, program: int = PIANO_PROGRAM
) -> pretty_midi.PrettyMIDI:
    """A new one-track piano file at a constant tempo (times in `notes` are seconds)."""
    pm = pretty_midi.PrettyMIDI(resolution=TICKS_PER_QUARTER, initial_tempo=float(tempo_bpm))
    piano = pretty_midi.Instrument(program=program, name="Piano")
    piano.notes = fix_overlaps(notes)
    pm.instruments.append(piano)
    return pm


def tempo_at(pm: pretty_midi.PrettyMIDI, time_s: float) -> float:
    """Tempo in BPM in force at `time_s` (the default 120 when the file has none)."""
    times, tempi = pm.get_tempo_changes()
    if len(tempi) == 0:
        return DEFAULT_TEMPO_BPM
    idx = max(int(np.searchsorted(times, time_s, side="right")) - 1, 0)
    return float(tempi[idx])


def fold_pitch(pitch: int, lo: int = C.PIANO_MIN_PITCH, hi: int = C.PIANO_MAX_PITCH) -> int:
    """Move a pitch by octaves into [lo, hi] (an organ pedal C0 plays as C1 on a piano)."""
    while pitch < lo:
        pitch += 12
    while pitch > hi:
        pitch -= 12
    return pitch


def note_stats(notes: list[pretty_midi.Note]) -> dict[str, float]:
    """Summary numbers of a note list: count, span in seconds, pitch range, mean velocity."""
    if not notes:
        return {"notes": 0, "duration_s": 0.0}
    return {
        "notes": len(notes),
        "duration_s": round(max(n.end for n in notes), 3),  # seconds from file start to the last release
        "pitch_min": min(n.pitch for n in notes),
        "pitch_max": max(n.pitch for n in notes),
        "velocity_mean": round(float(np.mean([n.velocity for n in notes])), 1),
    }


def note_totals(notes: list[pretty_midi.Note]) -> dict[str, float]:
    """The additive part of `note_stats` (note count, seconds), summed over items in stage reports."""
    stats = note_stats(notes)
    return {"notes": stats["notes"], "duration_s": stats["duration_s"]}


def save_midi(pm: pretty_midi.PrettyMIDI, dest: Path | str) -> None:
    """Write `pm` atomically (a crash never leaves a partial file under `dest`)."""
    with atomic_path(dest) as tmp:
        pm.write(str(tmp))


# ---- per-item driver loop shared by the MIDI stages ------------------------------------------------------------


@dataclass
class ItemResult:
    """What one item produced: output paths relative to the stage dir, filtered-out parts, per-item figures."""

    outputs: list[str] = field(default_factory=list)
    dropped: dict[str, str] = field(default_factory=dict)  # item or sub-item id -> reason
    stats: dict[str, float] = field(default_factory=dict)  # summed over items into the report


@dataclass
class Job:
    """One item to (re)build: its id, cache key, and the picklable call that builds it."""

    item_id: str
    key: str
    fn: Callable[..., ItemResult]
    args: tuple[Any, ...]


def _call(job: Job) -> ItemResult | str:
    """Run a job; a failure comes back as a one-line message so the pool and the other items go on."""
    try:
        return job.fn(*job.args)
    except Exception as err:
        return f"{type(err).__name__}: {err}".replace("\n", " ")[:500]


def _results(jobs: list[Job], workers: int) -> Iterator[tuple[Job, ItemResult | str]]:
    if workers <= 1 or len(jobs) <= 1:
        for job in jobs:
            yield job, _call(job)
        return
    # spawn, not fork: drivers run inside Prefect/MLflow processes whose background threads may hold locks
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=min(workers, len(jobs), os.cpu_count() or 1), mp_context=ctx) as pool:
        futures = {pool.submit(_call, job): job for job in jobs}
        for fut in as_completed(futures):
            yield futures[fut], fut.result()


def _forget_stale(index: ItemIndex, item_id: str, keep: list[str], base: Path) -> None:
    """Delete outputs an item made last time but not this time (fewer segments, now dropped or failing)."""
    for rel in index.entries.get(item_id, {}).get("outputs", []):
        if rel not in keep:
            (base / rel).unlink(missing_ok=True)


def run_jobs(jobs: list[Job], index: ItemIndex, out_dir: Path, report: StageReport, workers: int) -> None:
    """The driver loop: skip fresh items, build the rest (in `workers` processes), record everything.

    Cached items re-report their stored error or dropped reasons, so report.json always describes the whole
    input set, not just this run's work.
    """
    report.items_in += len(jobs)
    pending = []
    for job in jobs:
        entry = index.fresh(job.item_id, job.key, out_dir)
        if entry is None:
            pending.append(job)
            continue
        report.cached.append(job.item_id)
        if entry.get("error"):
            report.failed[job.item_id] = entry["error"]
        report.dropped.update(entry.get("dropped", {}))
    bar = tqdm(total=len(pending), desc=report.stage, disable=None, unit="item")
    for job, result in _results(pending, workers):
        bar.update()
        if isinstance(result, str):
            _forget_stale(index, job.item_id, [], out_dir)
            report.failed[job.item_id] = result
            index.record(job.item_id, job.key, error=result)
            continue
        _forget_stale(index, job.item_id, result.outputs, out_dir)
        report.processed.append(job.item_id)
        report.dropped.update(result.dropped)
        index.record(job.item_id, job.key, outputs=result.outputs, dropped=result.dropped, stats=result.stats)
    bar.close()


def summed_stats(index: ItemIndex, ids: Iterable[str]) -> dict[str, float]:
    """Per-item stats (as recorded in the index) summed over `ids`."""
    total: dict[str, float] = {}
    for item_id in ids:
        for name, value in index.entries.get(item_id, {}).get("stats", {}).items():
            total[name] = round(total.get(name, 0) + value, 3)
    return total


def count_outputs(index: ItemIndex, ids: Iterable[str]) -> int:
    """Number of output files the index holds for `ids`."""
    return sum(len(index.entries.get(i, {}).get("outputs", [])) for i in ids)
