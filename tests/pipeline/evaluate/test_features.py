"""Musical features and overlapping-area metrics on hand-made note lists with known answers."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.evaluate import features as F
from pipeline.evaluate.features import Note


def _scale(root: int = 60, velocity: int = 80) -> list[Note]:
    steps = [0, 2, 4, 5, 7, 9, 11, 12]  # C major, one note a beat
    return [Note(root + s, float(i), float(i) + 0.5, velocity) for i, s in enumerate(steps)]


def _chords() -> list[Note]:
    # A C-major triad held 2 beats, then a single G for 1 beat.
    return [Note(60, 0.0, 2.0, 70), Note(64, 0.0, 2.0, 70), Note(67, 0.0, 2.0, 70), Note(79, 2.0, 3.0, 90)]


def test_melodic_intervals_use_top_voice():
    assert F.melodic_intervals(_scale()).tolist() == [2, 2, 1, 2, 2, 2, 1]
    assert F.melodic_intervals(_chords()).tolist() == [79 - 67]


def test_ioi_counts_chords_once():
    assert F.inter_onset_intervals(_chords()).tolist() == [2.0]
    assert F.inter_onset_intervals(_scale()).tolist() == [1.0] * 7


def test_polyphony_at_onsets():
    assert F.polyphony(_chords()).tolist() == [3.0, 1.0]  # the triad has ended when the G starts
    legato = [Note(60, 0.0, 1.5, 80), Note(62, 1.0, 2.0, 80)]
    assert F.polyphony(legato).tolist() == [1.0, 2.0]


def test_windowed_range_and_density():
    notes = _scale()  # 8 onsets over 7.5 beats
    assert F.pitch_ranges(notes, window_beats=4.0).tolist() == [5.0, 5.0]  # C-F, then G-C
    assert F.note_density(notes, window_beats=4.0).tolist() == [1.0, pytest.approx(4 / 3.5)]
    assert F.note_density(notes, window_beats=100.0).tolist() == [pytest.approx(8 / 7.5)]


def test_out_of_key_share_per_window_in_any_key():
    assert F.out_of_key(_scale(), 8.0).tolist() == [0.0]  # C major
    assert F.out_of_key(F.transpose(_scale(), 5), 8.0).tolist() == [0.0]  # F major: still in a key
    chromatic = [Note(60 + i, float(i) / 2, float(i) / 2 + 0.4, 80) for i in range(12)]  # 12 pitch classes
    assert F.out_of_key(chromatic, 8.0).tolist() == [pytest.approx(5 / 12)]  # the best scale holds 7 of 12
    assert F.out_of_key(_chords(), 8.0).tolist() == [0.0]  # a triad and its fifth: four notes, one window
    assert F.out_of_key(_scale()[:3], 8.0).size == 0  # too few notes for a key


def test_feature_values_of_empty_piece_are_empty():
    values = F.feature_values([])
    assert set(values) == set(F.FEATURES)
    assert all(v.size == 0 for v in values.values())


@pytest.mark.parametrize("method", ["kde", "hist"])
def test_identical_sets_overlap_fully(method):
    pieces = [_scale(), _chords()]
    a, b = F.pooled_values(pieces), F.pooled_values([list(p) for p in pieces])
    oa = F.compare_sets(a, b, method)
    assert set(oa) == set(F.FEATURES)
    assert all(v == pytest.approx(1.0) for v in oa.values())
    assert F.style_score(oa) == pytest.approx(1.0)


@pytest.mark.parametrize("method", ["kde", "hist"])
def test_disjoint_values_do_not_overlap(method):
    assert F.overlap_area(np.array([20.0, 22, 24]), np.array([110.0, 112, 115]), "velocity", method) == (
        pytest.approx(0.0, abs=1e-6)
    )
    assert F.overlap_area(np.array([0.0, 2, 4]), np.array([1.0, 3, 5]), "pitch_class", method) == 0.0


def test_half_overlap_of_histograms():
    oa = F.overlap_area(np.array([0.0, 7.0]), np.array([0.0, 4.0]), "pitch_class", "hist")
    assert oa == pytest.approx(0.5)


def test_transposed_set_overlaps_less_in_pitch_class_only():
    real = F.pooled_values([_scale()])
    moved = F.pooled_values([F.transpose(_scale(), 6)])
    oa = F.compare_sets(moved, real, "hist")
    assert oa["pitch_class"] < 0.5
    assert oa["interval"] == pytest.approx(1.0) and oa["ioi"] == pytest.approx(1.0)


def test_empty_sample_scores_zero():
    assert F.overlap_area(np.zeros(0), np.array([1.0]), "ioi") == 0.0


def test_load_notes_round_trip(tmp_path):
    from symusic import Note as SNote
    from symusic import Score, Tempo, Track

    score = Score(480)
    track = Track(program=0)
    track.notes.append(SNote(0, 480, 60, 90))  # one beat at tick 0
    track.notes.append(SNote(960, 240, 67, 50))  # half a beat at beat 2
    score.tracks.append(track)
    score.tempos.append(Tempo(0, 90.0))
    path = tmp_path / "x.mid"
    score.dump_midi(str(path))
    assert F.load_notes(path) == [Note(60, 0.0, 1.0, 90), Note(67, 2.0, 2.5, 50)]


def test_hung_notes_forgive_the_cut_tail():
    closed = ["NoteOn_60", "Velocity_80", "TimeShift_1.0.8", "NoteOff_60"]
    assert F.hung_notes(closed, max_open_beats=4) == 0
    forgotten = ["NoteOn_60", "Velocity_80", *["TimeShift_2.0.8"] * 3, "NoteOn_64", "TimeShift_0.4.8"]
    assert F.hung_notes(forgotten, max_open_beats=4) == 1  # 60 open 6.5 beats; 64 opened 0.5 beats before the cut
    assert F.hung_notes(forgotten, max_open_beats=8) == 0
    repeated = ["NoteOn_60", "NoteOn_60", "TimeShift_4.0.8", "NoteOff_60", "TimeShift_4.0.8", "TimeShift_1.0.8"]
    assert F.hung_notes(repeated, max_open_beats=8) == 1  # two onsets, one off


def _midilike():
    import miditok

    config = miditok.TokenizerConfig(pitch_range=(21, 109), special_tokens=["PAD", "BOS", "EOS"])
    return miditok.MIDILike(config)


def test_check_sample_valid_and_invalid():
    tok = _midilike()
    ids = tok._tokens_to_ids(["NoteOn_60", "Velocity_79", "TimeShift_1.0.8", "NoteOff_60"])
    score, problems = F.check_sample(tok, ids, max_open_beats=4)
    assert problems == []
    assert F.notes_from_score(score) == [Note(60, 0.0, 1.0, 79)]
    hung = tok._tokens_to_ids(["NoteOn_60", "Velocity_79", *["TimeShift_4.0.4"] * 2])
    assert F.check_sample(tok, hung, max_open_beats=4)[1] == ["no notes", "1 hung note(s)"]
    assert F.check_sample(tok, [], max_open_beats=4) == (None, ["no tokens generated"])
