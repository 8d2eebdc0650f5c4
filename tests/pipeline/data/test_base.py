from __future__ import annotations

import numpy as np
import pytest
from music21 import dynamics, note, stream, tempo

from pipeline.core.graph import run_stage
from pipeline.core.items import AllItemsFailed
from pipeline.core.midi import load_midi
from pipeline.data.base import (
    corpus_file,
    corpus_item_id,
    export_corpus_piece,
    list_corpus_pieces,
    parse_corpus_piece,
    score_notes,
)


def test_pieces_alternate_composers_and_prefer_mxl():
    picked = list_corpus_pieces(["handel", "corelli", "bach"], max_pieces=4)
    assert [p.split("/")[0] for p in picked] == ["bach", "corelli", "handel", "bach"]
    assert picked == list_corpus_pieces(["bach", "corelli", "handel"], max_pieces=4)
    beethoven = list_corpus_pieces(["beethoven"], max_pieces=100)
    assert "beethoven/opus18no1/movement1.mxl" in beethoven
    assert not any(p.endswith(".krn") and p.replace(".krn", ".mxl") in beethoven for p in beethoven)


def test_item_ids_are_slugs_of_the_path():
    assert corpus_item_id("bach/bwv1.6.mxl") == "bach-bwv1-6"
    assert corpus_item_id("schumann_clara/polonaise_op1n1.mxl") == "schumann-clara-polonaise-op1n1"


def test_score_notes_follow_tempo_ties_and_dynamics():
    part = stream.Part()
    part.append(tempo.MetronomeMark(number=60))  # 1 s per quarter
    part.append(dynamics.Dynamic("p"))
    tied_a, tied_b = note.Note("C4", quarterLength=1), note.Note("C4", quarterLength=1)
    tied_a.tie, tied_b.tie = note.tie.Tie("start"), note.tie.Tie("stop")
    part.append([tied_a, tied_b])
    part.append(dynamics.Dynamic("ff"))
    part.append(note.Note("E4", quarterLength=2))
    score = stream.Score([part])
    notes, bpm = score_notes(score, seed_text="x")
    assert bpm == pytest.approx(60)
    assert [(n.pitch, n.start, n.end) for n in notes] == [(60, 0.0, 2.0), (64, 2.0, 4.0)]
    assert notes[1].velocity - notes[0].velocity > 30  # ff is much louder than p
    clipped, _ = score_notes(score, max_s=3.0, seed_text="x")
    assert clipped[-1].end == 3.0


def test_run_base_music21_is_incremental(make_cfg):
    cfg = make_cfg(base={"composers": ["corelli", "handel"], "max_pieces": 1})
    first = run_stage("base", cfg)
    assert first.processed == ["corelli-opus3no1-1grave"]
    pm = load_midi(cfg.stage_dir("base") / "midi/corelli-opus3no1-1grave.mid")
    assert len(pm.instruments) == 1 and pm.instruments[0].program == 0 and len(pm.instruments[0].notes) > 100
    grown = run_stage("base", cfg.model_copy(update={"base": cfg.base.model_copy(update={"max_pieces": 2})}))
    assert grown.processed == ["handel-rinaldo-lascia-chio-pianga"] and grown.cached == first.processed
    shrunk = run_stage("base", cfg)
    assert not shrunk.processed and not (cfg.stage_dir("base") / "midi/handel-rinaldo-lascia-chio-pianga.mid").exists()


def test_run_base_folder_validates_each_file(make_cfg, midi_file, tune, tmp_path):
    src = tmp_path / "midis"
    single = midi_file(src / "solo.mid", tune(20))
    midi_file(src / "nested/Quartet No 1.midi", tune(20), tracks=3)
    midi_file(src / "empty.mid", [])
    (src / "corrupt.mid").write_bytes(b"MThd\x00\x00\x00\x06\x00\x01")
    report = run_stage("base", make_cfg(base={"source": "folder", "path": str(src)}))
    out = tmp_path / "data/base/midi"
    assert sorted(p.name for p in out.glob("*.mid")) == ["nested-quartet-no-1.mid", "solo.mid"]
    assert (out / "solo.mid").read_bytes() == single.read_bytes()  # one track: copied as is
    assert len(load_midi(out / "nested-quartet-no-1.mid").instruments) == 1  # merged
    assert set(report.failed) == {"empty", "corrupt"}
    assert "no notes" in report.failed["empty"] and "unreadable" in report.failed["corrupt"]


def test_run_base_folder_all_bad_raises(make_cfg, tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in/x.mid").write_bytes(b"junk")
    with pytest.raises(AllItemsFailed):
        run_stage("base", make_cfg(base={"source": "folder", "path": str(tmp_path / "in")}))


def test_a_tune_collection_is_one_work_per_tune():
    tunes = list_corpus_pieces(["oneills1850"], max_pieces=3)
    assert tunes == [f"oneills1850/0001-0050.abc#{n}" for n in (1, 2, 3)]
    assert len({corpus_item_id(t) for t in tunes}) == 3 and corpus_item_id(tunes[1]) == "oneills1850-0001-0050-2"
    first, second = (parse_corpus_piece(t, max_s=20.0)[0] for t in tunes[:2])
    assert first and second and [n.pitch for n in first] != [n.pitch for n in second]
    assert corpus_file(tunes[1]).name == "0001-0050.abc"


def test_performed_base_pieces_leave_the_grid_and_spread_the_touch(make_cfg, tmp_path):
    def exported(perform: bool) -> tuple:
        cfg = make_cfg(base={"composers": ["bach"], "max_pieces": 1, "perform": perform})
        run_stage("base", cfg)
        pm = load_midi(cfg.stage_dir("base") / "midi/bach-bwv1-6.mid")
        return 60.0 / pm.get_tempo_changes()[1][0], sorted(pm.instruments[0].notes, key=lambda n: (n.start, n.pitch))

    def off_grid(notes, beat: float) -> float:  # share of onsets off the eighth-note grid
        return float(np.mean([abs(n.start / (beat / 2) - round(n.start / (beat / 2))) > 0.1 for n in notes]))

    (beat, exact), (_, played) = exported(False), exported(True)
    assert len(played) == len(exact)
    assert off_grid(exact, beat) < 0.1 < 0.5 < off_grid(played, beat)  # the score: only its sixteenths
    assert np.std([n.velocity for n in played]) > 2 * np.std([n.velocity for n in exact])
    for name in "ab":
        export_corpus_piece("bach/bwv1.6.mxl", tmp_path / f"{name}.mid", perform=True)
    assert (tmp_path / "a.mid").read_bytes() == (tmp_path / "b.mid").read_bytes()  # seeded: one performance per score
