"""Note lengths of a corpus as its tokens carry them: the note-ending rule's limit comes from here.

Each encoded piece reports a sparse histogram of its decoded note lengths on a 1/8-beat grid (`length_counts`,
item stats of the tokenize stage); the stage merges the training pieces' histograms and reports a high quantile
(`tokenize.note_length_quantile`) as `max_note_beats`, which the training stages write into bundle.json.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

from symusic import Score

BINS_PER_BEAT = 8  # histogram resolution: the tokenizer's finest grid with the default beat_res


def length_counts(score: Score) -> dict[str, int]:
    """Note count per length bin (key: length in 1/8 beats, as a string for JSON) of every track of `score`."""
    tpq = score.ticks_per_quarter
    counts = Counter(str(round(n.duration / tpq * BINS_PER_BEAT)) for track in score.tracks for n in track.notes)
    return dict(counts)


def merge_counts(histograms: Iterable[dict[str, int]]) -> dict[int, int]:
    """Sum sparse histograms (missing ones, from older cache entries, count as empty)."""
    total: Counter = Counter()
    for hist in histograms:
        total.update({int(k): int(v) for k, v in (hist or {}).items()})
    return dict(total)


def quantile_beats(counts: dict[int, int], q: float) -> float | None:
    """The smallest length (beats) at or below which a share `q` of the notes lie; None without notes."""
    n = sum(counts.values())
    if not n:
        return None
    seen = 0
    for bin_, count in sorted(counts.items()):
        seen += count
        if seen >= q * n:
            return bin_ / BINS_PER_BEAT
    return max(counts) / BINS_PER_BEAT


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
