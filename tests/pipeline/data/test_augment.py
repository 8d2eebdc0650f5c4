from __future__ import annotations

import pytest
from symusic import Note, Score, Track

from pipeline.core.config import AugmentConfig
from pipeline.core.files import piece_id, write_json
from pipeline.core.graph import run_stage
from pipeline.data.augment import augment_copies, copy_tag, time_stretch


def score_of(pitches: list[int], tpq: int = 480) -> Score:
    score = Score(tpq)
    track = Track(program=0)
    for i, p in enumerate(pitches):
        track.notes.append(Note(i * tpq, tpq, p, 80))
    score.tracks.append(track)
    return score


def test_copy_tags_are_readable_and_stable():
    assert copy_tag() == "0"
    assert copy_tag(pitch=2, velocity=-8, tempo_factor=1.1) == "p+2_v-8_t1.10"
    assert copy_tag(duration_beats=-0.25) == "d-0.25"
    assert copy_tag(tempo_factor=0.9) == "t0.90"


def test_default_params_make_33_distinct_copies():
    copies = augment_copies(score_of([60, 62, 64, 65]), AugmentConfig())
    tags = [t for t, _ in copies]
    assert tags[0] == "0" and len(tags) == len(set(tags)) == (1 + 6 + 2 + 2) * 3
    shifted = dict(copies)["p+2"]
    assert [n.pitch for n in shifted.tracks[0].notes] == [62, 64, 66, 67]


def test_pitch_copies_never_leave_the_piano():
    tags = [t for t, _ in augment_copies(score_of([60, 107]), AugmentConfig(tempo_factors=[]))]
    assert "p+1" in tags and "p+2" not in tags and "p+3" not in tags and "p-3" in tags


def test_duration_offsets_shorten_and_lengthen():
    copies = dict(augment_copies(score_of([60]), AugmentConfig(pitch_offsets=[], velocity_offsets=[])))
    assert copies["d-0.25"].tracks[0].notes[0].duration == 360  # 1 beat - 1/4 beat at 480 ticks per beat
    assert copies["d+0.25"].tracks[0].notes[0].duration == 600


def test_time_stretch_scales_ticks_not_just_tempo():
    stretched = time_stretch(score_of([60, 62, 64]), 1.1)
    assert [(n.time, n.duration) for n in stretched.tracks[0].notes] == [(0, 528), (528, 528), (1056, 528)]


def test_empty_piece_is_an_error():
    with pytest.raises(ValueError, match="no notes"):
        augment_copies(score_of([]), AugmentConfig())


def test_run_augment_fifty_train_pieces_give_at_least_500(make_cfg, midi_file, tune):
    cfg = make_cfg()
    clean = cfg.stage_dir("clean") / "style"
    train = [f"take-{i:02d}" for i in range(50)]
    for item in [*train, "held-out"]:
        midi_file(clean / f"{item}.mid", tune(12, low=48 + len(item) % 12))
    (clean / "broken.mid").write_bytes(b"MThd junk")
    split = {"a": {"train": [*train[:30], "broken"], "valid": ["held-out"]}, "b": {"train": train[30:]}}
    write_json(cfg.stage_dir("split") / "split.json", {"styles": split})  # every style's train pieces

    report = run_stage("augment", cfg)
    out = sorted(p.stem for p in (cfg.stage_dir("augment") / "midi").glob("*.mid"))
    assert len(out) >= 500 and report.outputs == len(out)
    assert report.stats["pieces_in"] == 50 and report.stats["factor"] >= 10
    assert {piece_id(o) for o in out} == set(train)  # nothing from valid/test, nothing broken
    assert "take-00__a0" in out and "take-00__ap+2_t1.10" in out and "take-00__ap+2_v+8" not in out
    assert list(report.failed) == ["broken"]

    again = run_stage("augment", cfg)
    assert not again.processed and len(again.cached) == 51
