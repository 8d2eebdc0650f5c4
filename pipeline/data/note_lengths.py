"""Note lengths and polyphony of a corpus as its tokens carry them: the decoding rules' limits come from here.

Each encoded piece reports sparse histograms of its decoded note lengths on a 1/8-beat grid (`length_counts`) and
of the notes sounding at each of its onsets (`polyphony_counts`), item stats of the tokenize stage; the stage merges
the training pieces' histograms and reports high quantiles (`tokenize.note_length_quantile`) as `max_note_beats` and
`max_polyphony`, which the training stages write into bundle.json for the runner's note-ending and polyphony rules.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

import numpy as np
from symusic import Score

BINS_PER_BEAT = 8  # histogram resolution: the tokenizer's finest grid with the default beat_res


def length_counts(score: Score) -> dict[str, int]:
    """Note count per length bin (key: length in 1/8 beats, as a string for JSON) of every track of `score`."""
    tpq = score.ticks_per_quarter
    counts = Counter(str(round(n.duration / tpq * BINS_PER_BEAT)) for track in score.tracks for n in track.notes)
    return dict(counts)


def polyphony_counts(score: Score) -> dict[str, int]:
    """Count of onsets per number of notes sounding there (the new ones included) over every track of `score`."""
    starts = np.sort([n.start for track in score.tracks for n in track.notes])
    ends = np.sort([n.end for track in score.tracks for n in track.notes])
    onsets = np.unique(starts)
    sounding = np.searchsorted(starts, onsets, side="right") - np.searchsorted(ends, onsets, side="right")
    return {str(k): int(v) for k, v in zip(*np.unique(sounding, return_counts=True), strict=True)}


def merge_counts(histograms: Iterable[dict[str, int]]) -> dict[int, int]:
    """Sum sparse histograms (missing ones, from older cache entries, count as empty)."""
    total: Counter = Counter()
    for hist in histograms:
        total.update({int(k): int(v) for k, v in (hist or {}).items()})
    return dict(total)


def quantile_bin(counts: dict[int, int], q: float) -> int | None:
    """The smallest bin at or below which a share `q` of the counts lie; None without counts."""
    n = sum(counts.values())
    if not n:
        return None
    seen = 0
    for bin_, count in sorted(counts.items()):
        seen += count
        if seen >= q * n:
            return bin_
    return max(counts)


def quantile_beats(counts: dict[int, int], q: float) -> float | None:
    """The smallest length (beats) at or below which a share `q` of the notes lie; None without notes."""
    bin_ = quantile_bin(counts, q)
    return None if bin_ is None else bin_ / BINS_PER_BEAT


def length_stats(counts: dict[int, int], q: float) -> dict[str, float | int | None]:
    """What the tokenize report says about note lengths (beats)."""
    return {
        "notes": sum(counts.values()),
        "p50_beats": quantile_beats(counts, 0.5),
        "p99_beats": quantile_beats(counts, 0.99),
        "quantile": q,
        "max_note_beats": quantile_beats(counts, q),
        "longest_beats": max(counts) / BINS_PER_BEAT if counts else None,
    }


def polyphony_stats(counts: dict[int, int], q: float) -> dict[str, float | int | None]:
    """What the tokenize report says about notes sounding at an onset: `max_polyphony` is the `q` quantile."""
    n = sum(counts.values())
    return {
        "onsets": n,
        "mean": round(sum(k * v for k, v in counts.items()) / n, 3) if n else None,
        "p50": quantile_bin(counts, 0.5),
        "quantile": q,
        "max_polyphony": quantile_bin(counts, q),
        "most": max(counts) if counts else None,
    }
