"""How many notes survive tokenize's encode -> decode: the check `tokenize` reports per piece (`roundtrip_*`)."""

from __future__ import annotations

from collections import defaultdict

import miditok
import numpy as np
from miditok.utils.utils import np_get_closest  # not re-exported by miditok.utils
from symusic import Score


def roundtrip_counts(tokenizer: miditok.MusicTokenizer, original: Score, decoded: Score) -> dict[str, int]:
    """Notes of `original` that survive encode -> decode within the tokenizer's quantization.

    A note matches an unused decoded note of the same pitch whose onset is within half the finest grid step,
    whose velocity is the original's velocity bin, and whose duration is within one grid step of the beat range
    it falls in (notes longer than the grid's last beat may also come back capped there). Times are in beats.

    Returns:
        `notes` in `original`, `matched` (all four criteria), `onsets_matched` (pitch and onset only: MIDILike
        cannot tell overlapping notes of one pitch apart, so only their durations may differ).
    """
    step = 1.0 / tokenizer.config.max_num_pos_per_beat  # beats
    ranges = sorted((lo, hi, 1.0 / res) for (lo, hi), res in tokenizer.config.beat_res.items())
    lookup: dict[tuple[int, int], list[tuple[float, float, int]]] = defaultdict(list)
    for onset, dur, pitch, vel in _note_table(decoded):
        lookup[(int(pitch), round(onset / step))].append((onset, dur, int(vel)))
    table = _note_table(original)
    vel_bins = np_get_closest(tokenizer.velocities, table[:, 3]) if len(table) else []
    matched = onsets = 0
    for (onset, dur, pitch, _), vel_bin in zip(table, vel_bins, strict=True):
        near = _pop_nearest(lookup, int(pitch), onset, step)
        onsets += near is not None
        matched += near is not None and near[2] == vel_bin and _duration_ok(dur, near[1], ranges, step)
    return {"notes": len(table), "matched": int(matched), "onsets_matched": onsets}


def _note_table(score: Score) -> np.ndarray:
    """(n_notes, 4) float64: onset (beats), duration (beats), pitch, velocity, over all tracks."""
    soas = [track.notes.numpy() for track in score.tracks]
    cols = [np.column_stack([soa[k] for k in ("time", "duration", "pitch", "velocity")]) for soa in soas]
    table = np.concatenate(cols or [np.zeros((0, 4))]).astype(np.float64)
    table[:, :2] /= score.ticks_per_quarter
    return table


def _pop_nearest(lookup: dict, pitch: int, onset: float, step: float) -> tuple[float, float, int] | None:
    center = round(onset / step)
    best = None
    for cell in (center - 1, center, center + 1):
        for j, cand in enumerate(lookup.get((pitch, cell), [])):
            err = abs(cand[0] - onset)
            if err <= step / 2 + 1e-9 and (best is None or err < best[0]):
                best = (err, cell, j)
    return None if best is None else lookup[(pitch, best[1])].pop(best[2])


def _duration_ok(original: float, decoded: float, ranges: list[tuple[int, int, float]], step: float) -> bool:
    tol = max([step] + [g for lo, hi, g in ranges if lo <= original < hi]) + 1e-9
    longest = ranges[-1][1]
    return abs(decoded - original) <= tol or (original > longest and abs(decoded - longest) <= tol)
