"""MIDI helpers shared by the symbolic stages (demo, base, transcribe, clean).

A "piano track" is one non-drum instrument, program 0, notes sorted by onset. Merging a file's tracks into one is
written once per MIDI library: `merge_piano` here (pretty_midi), `pipeline.data.tokenize.load_piano_score`
(symusic, which miditok reads). Why two libraries: Basic Pitch hands back pretty_midi notes, and clean's
thresholds are in seconds, which pretty_midi keeps (symusic counts ticks); writing these stages' files with symusic
instead would change every stored file's bytes (and so every downstream cache key) for no gain in what they hold.
augment and tokenize use symusic because miditok does.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pretty_midi

from pipeline.core import constants as C
from pipeline.core.files import atomic_path

PIANO_PROGRAM = 0  # GM Acoustic Grand Piano
DEFAULT_TEMPO_BPM = 120.0  # MIDI's own default; used when a source has no tempo
TICKS_PER_QUARTER = 480  # resolution of MIDI files we create (pretty_midi's 220 is coarse for 1/32 triplets)
MIN_NOTE_S = 1e-3  # seconds; shorter notes (after overlap trimming) cannot be written meaningfully
SUSTAIN_CC = 64  # MIDI controller number of the sustain (damper) pedal


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


def melodic(pm: pretty_midi.PrettyMIDI) -> list[pretty_midi.Instrument]:
    """The instruments whose notes make the piano part: all but drums."""
    return [inst for inst in pm.instruments if not inst.is_drum]


def piano_notes(pm: pretty_midi.PrettyMIDI) -> list[pretty_midi.Note]:
    """All non-drum notes of a file as one piano part (see `fix_overlaps`)."""
    return fix_overlaps(n for inst in melodic(pm) for n in inst.notes)


def _piano(notes: list[pretty_midi.Note], controls: list[pretty_midi.ControlChange], program: int):
    piano = pretty_midi.Instrument(program=program, name="Piano")
    piano.notes, piano.control_changes = notes, controls
    return piano


def merge_piano(pm: pretty_midi.PrettyMIDI) -> pretty_midi.PrettyMIDI:
    """`pm` in place as one piano track: every non-drum note (sorted, overlaps kept) and sustain pedal change.

    The tempo map, meter and text events are kept.
    """
    parts = melodic(pm)
    notes = sorted((n for inst in parts for n in inst.notes), key=lambda n: (n.start, n.pitch))
    pedal = sorted((cc for inst in parts for cc in inst.control_changes if cc.number == SUSTAIN_CC), key=_time)
    pm.instruments = [_piano(notes, pedal, PIANO_PROGRAM)]
    return pm


def _time(cc: pretty_midi.ControlChange) -> float:
    return cc.time


def with_notes(
    pm: pretty_midi.PrettyMIDI, notes: list[pretty_midi.Note], program: int = PIANO_PROGRAM
) -> pretty_midi.PrettyMIDI:
    """A copy of `pm` (tempo map, time signatures kept) whose only instrument is a piano holding `notes`.

    Sustain-pedal and other control changes of the first non-drum instrument are kept: transcriptions and
    piano MIDI carry their pedalling there.
    """
    out = copy.copy(pm)
    parts = melodic(pm)
    out.instruments = [_piano(list(notes), list(parts[0].control_changes) if parts else [], program)]
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
