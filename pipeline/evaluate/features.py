"""Musical features of note lists and the overlapping-area (OA) metric between two sets of pieces.

Follows Yang & Lerch 2020 ("On the evaluation of generative models in music"): each feature is a distribution
pooled over a set of pieces; two sets are compared by the overlapping area of their (KDE or histogram) densities,
1 for identical distributions, 0 for disjoint ones. Time is in beats (quarter notes), the tokenizer's own grid,
so pieces at different tempos compare fairly.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Literal, NamedTuple

import numpy as np

from pipeline.core import constants as C

OAMethod = Literal["kde", "hist"]
KDE_GRID_POINTS = 512  # density evaluation points per feature range


class Note(NamedTuple):
    """One note; times in beats."""

    pitch: int
    start: float
    end: float
    velocity: int


class FeatureSpec(NamedTuple):
    """Range a feature is clipped to, histogram bin width, and the smallest KDE bandwidth (feature units)."""

    lo: float
    hi: float
    bin_width: float
    min_bw: float


# Ranges cover ordinary piano music; values outside are clipped into the edge bins so they still count.
FEATURES: dict[str, FeatureSpec] = {
    "pitch_class": FeatureSpec(-0.5, 11.5, 1.0, 0.0),  # categorical: always compared as a 12-bin histogram
    "pitch_range": FeatureSpec(0.0, 88.0, 2.0, 1.0),  # semitones spanned per window
    "interval": FeatureSpec(-36.0, 36.0, 1.0, 0.5),  # semitones between successive top-voice onsets
    "ioi": FeatureSpec(0.0, 4.0, 0.125, 0.0625),  # beats between distinct onsets
    "duration": FeatureSpec(0.0, 8.0, 0.25, 0.0625),  # beats
    "velocity": FeatureSpec(0.0, 127.0, 4.0, 2.0),  # MIDI velocity
    "polyphony": FeatureSpec(0.0, 16.0, 1.0, 0.5),  # notes sounding at each onset
    "density": FeatureSpec(0.0, 16.0, 0.5, 0.25),  # note onsets per beat, per window
}


def notes_from_score(score) -> list[Note]:
    """Notes of every non-drum track of a `symusic.Score`, in beats, sorted by onset then pitch."""
    quarter = score.to("quarter")
    notes = [
        Note(int(n.pitch), float(n.time), float(n.time + n.duration), int(n.velocity))
        for track in quarter.tracks
        if not track.is_drum
        for n in track.notes
    ]
    return sorted(notes, key=lambda n: (n.start, n.pitch))


def load_notes(path: Path | str) -> list[Note]:
    """Read a MIDI file into notes in beats."""
    from symusic import Score

    return notes_from_score(Score(str(path)))


def transpose(notes: Iterable[Note], semitones: int) -> list[Note]:
    """The same notes shifted by `semitones`."""
    return [n._replace(pitch=n.pitch + semitones) for n in notes]


def _onsets(notes: Sequence[Note]) -> np.ndarray:
    return np.unique([n.start for n in notes])


def melodic_intervals(notes: Sequence[Note]) -> np.ndarray:
    """Signed semitone steps between the highest notes of successive distinct onsets (the skyline melody)."""
    top: dict[float, int] = {}
    for n in notes:
        top[n.start] = max(top.get(n.start, n.pitch), n.pitch)
    return np.diff([top[t] for t in sorted(top)]).astype(float)


def inter_onset_intervals(notes: Sequence[Note]) -> np.ndarray:
    """Beats between successive distinct onsets; chords count once."""
    return np.diff(_onsets(notes))


def polyphony(notes: Sequence[Note]) -> np.ndarray:
    """Number of notes sounding at each distinct onset (a note sounds on [start, end))."""
    onsets = _onsets(notes)
    starts = np.sort([n.start for n in notes])
    ends = np.sort([n.end for n in notes])
    started = np.searchsorted(starts, onsets, side="right")
    ended = np.searchsorted(ends, onsets, side="right")
    return (started - ended).astype(float)


def note_windows(notes: Sequence[Note], window_beats: float) -> list[tuple[list[Note], float]]:
    """Notes grouped by the window their onset falls in, with each window's length in beats.

    The last window is as long as the music lasts; one shorter than a quarter window is left out unless it is
    the only one, so a tail does not fake a low density.
    """
    if not notes:
        return []
    first = min(n.start for n in notes)
    last = max(n.end for n in notes)
    n_win = max(1, int(np.ceil((last - first) / window_beats)))
    groups: list[list[Note]] = [[] for _ in range(n_win)]
    for n in notes:
        groups[min(int((n.start - first) // window_beats), n_win - 1)].append(n)
    lengths = [min(window_beats, last - first - i * window_beats) for i in range(n_win)]
    keep = [i for i in range(n_win) if n_win == 1 or lengths[i] >= window_beats / 4]
    return [(groups[i], max(lengths[i], 1e-9)) for i in keep]


def pitch_ranges(notes: Sequence[Note], window_beats: float) -> np.ndarray:
    """Highest minus lowest pitch in each window that has notes."""
    return np.array(
        [max(n.pitch for n in g) - min(n.pitch for n in g) for g, _ in note_windows(notes, window_beats) if g], float
    )


def note_density(notes: Sequence[Note], window_beats: float) -> np.ndarray:
    """Distinct onsets per beat in each window."""
    return np.array([len(_onsets(g)) / length for g, length in note_windows(notes, window_beats)], float)


DIATONIC = np.array([1, 0, 1, 0, 1, 1, 0, 1, 0, 1, 0, 1], float)  # the major scale's pitch classes (and its modes)
KEY_MIN_NOTES = 4  # fewer notes in a window: no key to judge


def out_of_key(notes: Sequence[Note], window_beats: float) -> np.ndarray:
    """Per window of at least KEY_MIN_NOTES notes: the share of its notes outside the diatonic scale that holds
    most of them (any of the 12 transpositions; natural minor and the church modes are the same sets).

    Independent of key and tokenizer; a harmonic minor's leading tone or a passing chromatic note counts as out.
    """
    out = []
    for group, _ in note_windows(notes, window_beats):
        if len(group) < KEY_MIN_NOTES:
            continue
        pcs = np.bincount([n.pitch % 12 for n in group], minlength=12) / len(group)
        out.append(1.0 - max(float(np.roll(DIATONIC, k) @ pcs) for k in range(12)))
    return np.array(out, float)


def mean_out_of_key(pieces: Iterable[Sequence[Note]], window_beats: float) -> float:
    """`out_of_key` over every judged window of `pieces`, averaged; nan when no window holds enough notes."""
    values = np.concatenate([out_of_key(p, window_beats) for p in pieces if p] or [np.zeros(0)])
    return float(values.mean()) if values.size else float("nan")


def feature_values(notes: Sequence[Note], window_beats: float = 8.0) -> dict[str, np.ndarray]:
    """Every feature's sample values for one piece (empty arrays for no notes).

    Args:
        notes: the piece.
        window_beats: window length for the per-window features (pitch range, density).

    Returns:
        Feature name (keys of `FEATURES`) -> 1-D array of values.
    """
    if not notes:
        return {name: np.zeros(0) for name in FEATURES}
    return {
        "pitch_class": np.array([n.pitch % 12 for n in notes], float),
        "pitch_range": pitch_ranges(notes, window_beats),
        "interval": melodic_intervals(notes),
        "ioi": inter_onset_intervals(notes),
        "duration": np.array([n.end - n.start for n in notes], float),
        "velocity": np.array([n.velocity for n in notes], float),
        "polyphony": polyphony(notes),
        "density": note_density(notes, window_beats),
    }


def pooled_values(pieces: Iterable[Sequence[Note]], window_beats: float = 8.0) -> dict[str, np.ndarray]:
    """Feature values of a set of pieces, concatenated per feature."""
    per_piece = [feature_values(p, window_beats) for p in pieces]
    return {name: np.concatenate([v[name] for v in per_piece] or [np.zeros(0)]) for name in FEATURES}


def _histogram(values: np.ndarray, spec: FeatureSpec) -> np.ndarray:
    n_bins = max(1, round((spec.hi - spec.lo) / spec.bin_width))
    counts, _ = np.histogram(np.clip(values, spec.lo, spec.hi), bins=n_bins, range=(spec.lo, spec.hi))
    return counts / counts.sum()


def _kde(values: np.ndarray, grid: np.ndarray, spec: FeatureSpec) -> np.ndarray:
    """Gaussian KDE (Silverman's bandwidth, floored at `spec.min_bw`), normalised to sum 1 over `grid`."""
    values = np.clip(values, spec.lo, spec.hi)
    bw = max(1.06 * float(np.std(values)) * len(values) ** (-1 / 5), spec.min_bw)
    # One kernel per distinct value, weighted by its count: the same sum (to float rounding) in a fraction of the
    # exps, since the features are counts or on the tokenizer's time grid (a few dozen distinct values among
    # thousands; the bootstrap's 400 resamples spent most of evaluation's scoring here). Chunked so (grid, chunk)
    # stays small when values are many and distinct.
    distinct, counts = np.unique(values, return_counts=True)
    density = np.zeros_like(grid)
    for i in range(0, len(distinct), 4096):
        z = (grid[:, None] - distinct[None, i : i + 4096]) / bw
        density += np.exp(-0.5 * z * z) @ counts[i : i + 4096]
    return density / density.sum()


def distribution(values: np.ndarray, feature: str, method: OAMethod = "kde") -> np.ndarray | None:
    """One sample's distribution of a feature, as `overlap_area` compares it: a KDE on the feature's grid, or a
    histogram ("hist", and always for pitch class); None for an empty sample."""
    spec = FEATURES[feature]
    values = np.asarray(values, float)
    if values.size == 0:
        return None
    if method == "hist" or feature == "pitch_class":
        return _histogram(values, spec)
    return _kde(values, np.linspace(spec.lo, spec.hi, KDE_GRID_POINTS), spec)


def overlap_area(a: np.ndarray, b: np.ndarray, feature: str, method: OAMethod = "kde") -> float:
    """Overlapping area of the distributions of two samples of one feature, in [0, 1].

    Args:
        a: values of the feature in one set.
        b: values in the other set.
        feature: a key of `FEATURES` (gives the range, bins and bandwidth floor).
        method: "kde" (smooth, as Yang & Lerch) or "hist" (fixed bins). Pitch class is always a histogram.

    Returns:
        1.0 for identical distributions, 0.0 for disjoint ones; 0.0 when either sample is empty (no evidence
        of similarity).
    """
    return _overlap(distribution(a, feature, method), distribution(b, feature, method))


def _overlap(p: np.ndarray | None, q: np.ndarray | None) -> float:
    if p is None or q is None:
        return 0.0
    return round(float(np.clip(np.minimum(p, q).sum(), 0.0, 1.0)), 6)  # 6 digits: no 1e-269 noise in tables


def distributions(values: dict[str, np.ndarray], method: OAMethod = "kde") -> dict[str, np.ndarray | None]:
    """`distribution` of every feature of one set's pooled values."""
    return {name: distribution(values[name], name, method) for name in FEATURES}


def compare_sets(
    generated: dict[str, np.ndarray],
    real: dict[str, np.ndarray],
    method: OAMethod = "kde",
    real_dists: dict[str, np.ndarray | None] | None = None,
) -> dict[str, float]:
    """OA per feature between two sets' pooled values (see `pooled_values`); `real_dists`: the real set's
    `distributions`, computed once by a caller comparing many sets against it (the bootstrap: 400 per style)."""
    real_dists = real_dists if real_dists is not None else distributions(real, method)
    return {name: _overlap(distribution(generated[name], name, method), real_dists[name]) for name in FEATURES}


def style_score(oa: dict[str, float]) -> float:
    """One summary number: the mean OA over features."""
    return float(np.mean(list(oa.values()))) if oa else 0.0


# ---------------------------------------------------------------- validity of generated tokens


def token_strings(tokenizer, ids: list[int]) -> list[str]:
    """Base-vocabulary token strings of (possibly BPE-encoded) ids."""
    from miditok import TokSequence

    seq = TokSequence(ids=list(ids), are_ids_encoded=tokenizer.is_trained)
    if tokenizer.is_trained:
        tokenizer.decode_token_ids(seq)
    tokenizer.complete_sequence(seq)
    return list(seq.tokens)


def _beats(value: str) -> float:
    whole, frac, res = (int(v) for v in value.split("."))
    return whole + frac / res


def hung_notes(tokens: list[str], max_open_beats: float) -> int:
    """NoteOns never matched by a NoteOff although the sample went on `max_open_beats` beats after them.

    Notes opened near the end are forgiven: the sample was cut there, not the note forgotten.
    """
    now, open_at = 0.0, {}
    for tok in tokens:
        kind, _, value = tok.partition("_")
        if kind in ("TimeShift", "Rest"):
            now += _beats(value)
        elif kind == "NoteOn":
            open_at.setdefault(value, []).append(now)
        elif kind == "NoteOff" and open_at.get(value):
            open_at[value].pop(0)
    return sum(1 for onsets in open_at.values() for t in onsets if now - t > max_open_beats)


def check_sample(tokenizer, ids: list[int], max_open_beats: float) -> tuple[Any, list[str]]:
    """Decode generated ids and list what makes them invalid MIDI (empty list: valid).

    Invalid: the decoder fails, no notes, hung notes (`hung_notes`), a pitch off the piano, a zero-length note.

    Returns:
        (symusic Score or None when decoding failed, problems).
    """
    from miditok import TokSequence

    if not ids:
        return None, ["no tokens generated"]
    try:
        seq = TokSequence(ids=list(ids), are_ids_encoded=tokenizer.is_trained)
        score = tokenizer.decode(seq if tokenizer.one_token_stream else [seq])
        hung = hung_notes(token_strings(tokenizer, ids), max_open_beats)
    except Exception as err:  # any decoder failure makes the sample invalid, not the evaluation
        return None, [f"decode error: {type(err).__name__}: {err}"]
    notes = notes_from_score(score)
    problems = [] if notes else ["no notes"]
    if hung:
        problems.append(f"{hung} hung note(s)")
    if any(not C.PIANO_MIN_PITCH <= n.pitch <= C.PIANO_MAX_PITCH for n in notes):
        problems.append("pitch outside the piano range")
    if any(n.end <= n.start for n in notes):
        problems.append("note without duration")
    return score, problems
