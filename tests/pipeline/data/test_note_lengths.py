"""The corpus statistics the decoding rules' limits come from: note lengths and notes sounding at an onset."""

from __future__ import annotations

from symusic import Note, Score, Track

from pipeline.data.note_lengths import length_counts, merge_counts, polyphony_counts, polyphony_stats, quantile_beats


def _score(notes: list[tuple[int, int, int]]) -> Score:
    """(start, end, pitch) in ticks at 480 per quarter."""
    score = Score(480)
    track = Track()
    for start, end, pitch in notes:
        track.notes.append(Note(start, end - start, pitch, 80))
    score.tracks.append(track)
    return score


def test_polyphony_counts_the_notes_sounding_at_each_onset():
    # a held bass (0-1920) under a two-note chord at 0, one note at 480 (the chord ended at 480), one at 960
    score = _score([(0, 1920, 40), (0, 480, 60), (0, 480, 64), (480, 960, 62), (960, 1440, 67)])
    assert polyphony_counts(score) == {"3": 1, "2": 2}  # onset 0: 3 sound; 480: bass + 62; 960: bass + 67
    stats = polyphony_stats(merge_counts([polyphony_counts(score), {"6": 1}]), 0.75)
    assert stats["onsets"] == 4 and stats["max_polyphony"] == 3 and stats["most"] == 6 and stats["p50"] == 2


def test_length_quantile_in_beats():
    score = _score([(0, 480, 60), (0, 240, 64), (480, 2400, 62)])
    counts = merge_counts([length_counts(score)])
    assert counts == {8: 1, 4: 1, 32: 1}  # 1/8-beat bins
    assert quantile_beats(counts, 0.5) == 1.0 and quantile_beats(counts, 1.0) == 4.0 and quantile_beats({}, 0.5) is None
