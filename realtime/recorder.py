"""The session on disk: human and model on separate tracks of one MIDI file, every note ended.

Also `ClockTempo`, which follows an incoming MIDI clock (24 pulses per quarter note) to a tempo in BPM.
"""

from __future__ import annotations

import os
import threading
from collections import deque
from pathlib import Path

import mido

from realtime import constants as C
from realtime.scheduler import is_note_off, is_note_on

RECORDED_TYPES = ("note_on", "note_off", "control_change")
TRACKS = ("human", "model")


class SessionRecorder:
    """Thread-safe log of (session seconds, track, message); written once at the end."""

    def __init__(self) -> None:
        self._events: list[tuple[float, int, mido.Message]] = []
        self._lock = threading.Lock()

    def add(self, track: str, msg: mido.Message, at: float) -> None:
        """Log a note/control message on "human" or "model" (other types are not recorded)."""
        if msg.type in RECORDED_TYPES:
            with self._lock:
                self._events.append((at, TRACKS.index(track), msg))

    def messages(self, track: str) -> list[tuple[float, mido.Message]]:
        """(time, message) of one track, time-ordered."""
        idx = TRACKS.index(track)
        with self._lock:
            return sorted(((t, m) for t, i, m in self._events if i == idx), key=lambda e: e[0])

    def to_midi(self, tempo_bpm: float, start: float | None = None) -> mido.MidiFile:
        """A type-1 file: track "human", track "model"; notes still open at the end are ended there."""
        with self._lock:
            events = sorted(self._events, key=lambda e: e[0])
        t0 = start if start is not None else (events[0][0] if events else 0.0)
        end = events[-1][0] if events else t0
        ticks_per_s = C.RECORD_TPQ * tempo_bpm / 60.0
        midi = mido.MidiFile(type=1, ticks_per_beat=C.RECORD_TPQ)
        for idx, name in enumerate(TRACKS):
            msgs = [(t, m) for t, i, m in events if i == idx]
            msgs += [(end, m) for m in _closing_offs([m for _, m in msgs])]
            track = mido.MidiTrack([mido.MetaMessage("track_name", name=name)])
            if idx == 0:
                track.append(mido.MetaMessage("set_tempo", tempo=mido.bpm2tempo(tempo_bpm)))
            last = 0
            for t, msg in msgs:
                tick = max(last, round((t - t0) * ticks_per_s))
                track.append(msg.copy(time=tick - last))
                last = tick
            track.append(mido.MetaMessage("end_of_track", time=0))
            midi.tracks.append(track)
        return midi

    def save(self, path: Path, tempo_bpm: float, start: float | None = None) -> Path:
        """Write the file atomically (a crash mid-write leaves no half file)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        self.to_midi(tempo_bpm, start).save(str(tmp))
        os.replace(tmp, path)
        return path


def _closing_offs(msgs: list[mido.Message]) -> list[mido.Message]:
    """Note-offs for notes left sounding at the end of a track."""
    sounding: dict[tuple[int, int], int] = {}
    for msg in msgs:
        key = (getattr(msg, "channel", 0), getattr(msg, "note", -1))
        if is_note_on(msg):
            sounding[key] = sounding.get(key, 0) + 1
        elif is_note_off(msg) and sounding.get(key):
            sounding[key] -= 1
    return [mido.Message("note_off", channel=ch, note=n) for (ch, n), k in sorted(sounding.items()) for _ in range(k)]


class ClockTempo:
    """Tempo from MIDI clock pulses: the mean pulse interval over the last beat, once enough pulses came in."""

    def __init__(self) -> None:
        self._stamps: deque[float] = deque(maxlen=C.CLOCK_WINDOW + 1)

    def feed(self, at: float) -> float | None:
        """One clock pulse at session time `at`. Returns the tempo (BPM) when known and plausible, else None."""
        if self._stamps and at - self._stamps[-1] > C.CLOCK_MAX_GAP_S:
            self._stamps.clear()  # the clock stopped and restarted
        self._stamps.append(at)
        if len(self._stamps) <= C.CLOCK_MIN_INTERVALS:
            return None
        interval = (self._stamps[-1] - self._stamps[0]) / (len(self._stamps) - 1)
        if interval <= 0:
            return None
        bpm = 60.0 / (interval * C.CLOCK_PPQN)
        return bpm if C.MIN_BPM <= bpm <= C.MAX_BPM else None
