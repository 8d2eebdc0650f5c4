"""A simple pianist's left hand under a single-line tune: bass on the first beat, the chord on the others.

Used by the demo for its folk player: fiddle tunes are one melody line, which a pianist would not play bare. Per
bar, the chord is the key's I, IV or V (i, iv, V in minor) whose tones cover most of the bar's melody (weighted
by duration; ties go to the tonic, then the dominant). No library here writes an accompaniment from a melody and a
key (music21 analyses harmony but does not voice it), so this is our own, kept to the one texture it needs.
"""

from __future__ import annotations

from dataclasses import dataclass

import pretty_midi

# Chords as (degree in semitones above the tonic, third in semitones above the chord root), tonic first.
MAJOR_CHORDS = ((0, 4), (7, 4), (5, 4))  # I, V, IV
MINOR_CHORDS = ((0, 3), (7, 4), (5, 3))  # i, V (harmonic minor), iv
BASS_LOW = 40  # E2: the bass root is placed in [BASS_LOW, BASS_LOW + 12)
CHORD_LOW = 53  # F3: the chord's lowest tone is placed in [CHORD_LOW, CHORD_LOW + 12)
VELOCITY_SCALE = 0.7  # the left hand plays softer than the tune
HOLD = 0.9  # share of a beat each left-hand note is held (detached, as an oom-pah is played)


@dataclass(frozen=True)
class Meter:
    """Beats per bar, the beat's length in seconds and where bar 1 starts."""

    beats: int
    beat_s: float
    start_s: float = 0.0

    @property
    def bar_s(self) -> float:
        return self.beats * self.beat_s


def _place(pc: int, low: int) -> int:
    """The pitch of pitch class `pc` in [low, low + 12)."""
    return low + (pc - low) % 12


def choose_chord(melody: list[pretty_midi.Note], tonic: int, minor: bool) -> tuple[int, int]:
    """(root pitch class, third in semitones) of the I/IV/V chord that best covers `melody`'s pitch classes."""
    weight = [0.0] * 12
    for n in melody:
        weight[n.pitch % 12] += n.end - n.start
    best, best_score = None, -1.0
    for degree, third in MINOR_CHORDS if minor else MAJOR_CHORDS:
        root = (tonic + degree) % 12
        score = sum(weight[(root + step) % 12] for step in (0, third, 7))
        if score > best_score + 1e-9:  # strictly better: earlier (tonic, dominant) wins ties
            best, best_score = (root, third), score
    return best  # type: ignore[return-value]


def accompany(melody: list[pretty_midi.Note], tonic: int, minor: bool, meter: Meter) -> list[pretty_midi.Note]:
    """Left-hand notes for every bar the melody sounds in.

    Args:
        melody: the tune, times in seconds.
        tonic: pitch class of the key's tonic (0 = C).
        minor: minor key.
        meter: the tune's bars and beats.

    Returns:
        New notes (not including the melody), sorted by onset.
    """
    if not melody:
        return []
    velocity = max(1, round(VELOCITY_SCALE * sum(n.velocity for n in melody) / len(melody)))
    last = max(n.end for n in melody)
    out: list[pretty_midi.Note] = []
    bar = 0
    while (bar_start := meter.start_s + bar * meter.bar_s) < last:
        in_bar = [n for n in melody if bar_start <= n.start < bar_start + meter.bar_s]
        if in_bar:
            root, third = choose_chord(in_bar, tonic, minor)
            for beat in range(meter.beats):
                start = bar_start + beat * meter.beat_s
                end = min(start + HOLD * meter.beat_s, last)
                if end <= start:
                    break
                pitches = [_place(root, BASS_LOW)] if beat == 0 else _triad(root, third)
                out.extend(pretty_midi.Note(velocity, p, start, end) for p in pitches)
        bar += 1
    return out


def _triad(root: int, third: int) -> list[int]:
    low = _place(root, CHORD_LOW)
    return sorted(_place(pc, low) for pc in (root, (root + third) % 12, (root + 7) % 12))
