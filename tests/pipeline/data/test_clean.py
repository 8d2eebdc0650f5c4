from __future__ import annotations

import pretty_midi
import pytest

from pipeline.core.config import CleanConfig
from pipeline.core.files import read_json
from pipeline.core.graph import run_stage
from pipeline.core.items import AllItemsFailed
from pipeline.core.midi import load_midi
from pipeline.data.clean import clean_midi, filter_notes, note_free_gaps, piece_problem, segment_bounds


def notes_of(specs):
    return [pretty_midi.Note(v, p, s, e) for p, s, e, v in specs]


def test_filter_notes_counts_each_reason():
    cfg = CleanConfig(min_note_s=0.05, min_velocity=10, min_pitch=21, max_pitch=108)
    notes = notes_of([(60, 0, 1, 80), (61, 1, 1.01, 80), (62, 2, 3, 5), (10, 3, 4, 80), (115, 4, 5, 80)])
    kept, dropped = filter_notes(notes, cfg)
    assert [n.pitch for n in kept] == [60]
    assert dropped == {"short": 1, "quiet": 1, "out_of_range": 2}


def test_piece_problem_names_the_reason(tune):
    cfg = CleanConfig(min_notes=16, min_duration_s=4.0)
    assert "empty" in piece_problem([], cfg)
    assert "near-silent" in piece_problem(notes_of(tune(5)), cfg)
    assert "too short" in piece_problem(notes_of(tune(20, step=0.1)), cfg)
    assert piece_problem(notes_of(tune(40)), cfg) is None


def test_segments_cut_in_silence_and_keep_crossing_notes_whole(tune):
    # 0-29 s of notes, 2 s of silence, then 31-60 s; one long note from 58 s crossing nothing.
    specs = tune(116, step=0.25) + tune(116, start=31.0, step=0.25)
    notes = notes_of(specs)
    assert any(lo <= 30.0 <= hi for lo, hi in note_free_gaps(notes))
    bounds = segment_bounds(notes, 30.0)
    assert len(bounds) == 2
    assert 29.0 < bounds[0][1] < 31.0  # the cut lies in the note-free gap, not at exactly 30 s


def test_clean_midi_segments_own_their_starting_notes(tune):
    cfg = CleanConfig(min_notes=4, min_duration_s=1.0, segment_s=10.0)
    specs = tune(40, step=0.5, dur=0.5)  # 0..20 s legato: no note-free point, so the cut falls on an onset
    specs.append((72, 9.9, 12.0, 90))  # starts in segment 0, crosses the cut
    pm = pretty_midi.PrettyMIDI()
    inst = pretty_midi.Instrument(0)
    inst.notes = notes_of(specs)
    pm.instruments.append(inst)
    outputs, dropped, stats = clean_midi(pm, cfg)
    assert [s for s, _ in outputs] == ["__s00", "__s01"] and not dropped
    first = outputs[0][1].instruments[0].notes
    long_note = [n for n in first if n.pitch == 72]
    assert long_note and long_note[0].end - long_note[0].start == pytest.approx(2.1, abs=0.01)
    assert outputs[1][1].instruments[0].notes[0].start < 1.0  # segment re-starts near 0 s
    assert stats["notes_out"] == len(specs) == stats["notes_in"]


def test_run_clean_end_to_end(make_cfg, midi_file, tune, tmp_path):
    cfg = make_cfg(clean={"min_notes": 8, "min_duration_s": 2.0})
    style, base = cfg.project.data_dir / "transcribe/midi", cfg.project.data_dir / "base/midi"
    midi_file(style / "good.mid", [*tune(30), (60, 8.0, 8.01, 80), (64, 8.0, 9.0, 2)])
    midi_file(style / "silent.mid", [])
    midi_file(style / "short.mid", tune(12, step=0.1))
    (style / "corrupt.mid").write_bytes(b"MThd\x00\x00\x00\x06garbage")
    midi_file(base / "chorale.mid", tune(40), tracks=4)
    report = run_stage("clean", cfg)
    out = cfg.stage_dir("clean")
    assert sorted(p.name for p in (out / "style").glob("*.mid")) == ["good.mid"]
    assert len(load_midi(out / "base/chorale.mid").instruments) == 1  # merged to one piano track
    assert set(report.dropped) == {"style/silent", "style/short"}
    assert "empty" in report.dropped["style/silent"] and "too short" in report.dropped["style/short"]
    assert list(report.failed) == ["style/corrupt"] and "unreadable MIDI" in report.failed["style/corrupt"]
    assert report.stats["style"]["dropped_short"] == 1 and report.stats["style"]["dropped_quiet"] == 1
    assert read_json(out / "report.json")["outputs"] == 2

    again = run_stage("clean", cfg)
    assert not again.processed and len(again.cached) == 5 and set(again.dropped) == set(report.dropped)

    (style / "silent.mid").unlink()
    midi_file(style / "new.mid", tune(20))
    third = run_stage("clean", cfg)
    assert third.processed == ["style/new"] and "style/silent" not in third.dropped


def test_run_clean_resegmenting_removes_stale_outputs(make_cfg, midi_file, tune):
    cfg = make_cfg(clean={"min_notes": 4, "min_duration_s": 1.0, "segment_s": 10.0})
    midi_file(cfg.project.data_dir / "transcribe/midi/live.mid", tune(120, step=0.25))  # 30 s
    run_stage("clean", cfg)
    out = cfg.stage_dir("clean") / "style"
    assert sorted(p.stem for p in out.glob("*.mid")) == ["live__s00", "live__s01", "live__s02"]
    run_stage("clean", cfg.model_copy(update={"clean": cfg.clean.model_copy(update={"segment_s": 0.0})}))
    assert sorted(p.stem for p in out.glob("*.mid")) == ["live"]


def test_run_clean_all_failed_raises(make_cfg):
    cfg = make_cfg()
    bad = cfg.project.data_dir / "transcribe/midi/bad.mid"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"not a midi file")
    with pytest.raises(AllItemsFailed, match="bad"):
        run_stage("clean", cfg)
