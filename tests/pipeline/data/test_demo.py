from __future__ import annotations

import shutil

import numpy as np
import pretty_midi
import pytest
import soundfile as sf

from pipeline.core.config import ConfigError, config_from_dict
from pipeline.core.graph import run_stage
from pipeline.core.midi import load_midi
from pipeline.data.demo import additive_synth, renderer_for

PLAYERS = {
    "keys": {"composers": ["chopin", "joplin"], "max_pieces": 2},
    "fiddle": {"composers": ["ryansMammoth"], "max_pieces": 1, "accompany": True},
}
SMALL = {"players": PLAYERS, "excerpt_s": 4.0, "sample_rate": 16000}
IDS = ["fiddle/ryansmammoth-paddymilesfricasseereel", "keys/chopin-mazurka06-2", "keys/joplin-maple-leaf-rag"]


def test_demo_and_base_composers_must_differ():
    players = {"a": {"composers": ["chopin"]}, "b": {"composers": ["bach"]}}
    with pytest.raises(ConfigError, match=r"demo\.composers and base\.composers"):
        config_from_dict({"demo": {"players": players}})
    config_from_dict({"demo": {"players": players, "enabled": False}})  # no demo: no clash


def test_missing_soundfont_falls_back_with_warning(tmp_path):
    with pytest.warns(UserWarning, match="additive synth"):
        assert renderer_for(tmp_path / "missing.sf2") == "additive"


def test_additive_synth_sounds_only_where_notes_are():
    notes = [pretty_midi.Note(100, 69, 0.5, 1.0)]
    audio = additive_synth(notes, 8000, 2.0)
    assert audio.shape == (16000,) and audio.dtype == np.float32
    assert np.abs(audio[:3990]).max() == 0 and np.abs(audio[4000:8000]).max() > 0.1
    assert np.abs(audio[9000:]).max() == 0  # released (plus fade) by 1.08 s


@pytest.mark.skipif(shutil.which("fluidsynth") is None, reason="fluidsynth not installed")
def test_run_demo_renders_and_caches(make_cfg):
    cfg = make_cfg(demo=SMALL, project={"workers": 2})  # exercises the process pool
    report = run_stage("demo", cfg)
    assert sorted(report.processed) == IDS and report.stats["renderer"] == "fluidsynth"
    out = cfg.stage_dir("demo")
    for item in IDS:
        audio, rate = sf.read(out / f"audio/{item}.wav")
        notes = load_midi(out / f"scores/{item}.mid").instruments[0].notes
        assert rate == 16000 and audio.ndim == 1 and 4.0 < len(audio) / rate <= 5.0
        assert np.abs(audio).max() > 0.5 and notes and max(n.start for n in notes) < 4.0
    again = run_stage("demo", cfg)
    assert not again.processed and sorted(again.cached) == IDS


def test_run_demo_fallback_synth_and_pruning(make_cfg, tmp_path):
    cfg = make_cfg(demo={**SMALL, "soundfont": str(tmp_path / "nope.sf2")})
    with pytest.warns(UserWarning, match="soundfont"):
        report = run_stage("demo", cfg)
    assert report.stats["renderer"] == "additive" and sorted(report.processed) == IDS
    fewer = cfg.model_copy(update={"demo": config_from_dict({"demo": {**SMALL, "soundfont": str(tmp_path / "nope.sf2"),
        "players": {"keys": {**PLAYERS["keys"], "max_pieces": 1}}}}).demo})  # fmt: skip
    with pytest.warns(UserWarning):
        report = run_stage("demo", fewer)
    assert report.cached == ["keys/chopin-mazurka06-2"] and report.outputs == 2
    assert not (cfg.stage_dir("demo") / "audio/keys/joplin-maple-leaf-rag.wav").exists()
    assert not (cfg.stage_dir("demo") / "audio/fiddle").exists() or not any(
        (cfg.stage_dir("demo") / "audio/fiddle").iterdir()
    )


def test_the_accompanied_player_gets_a_left_hand_under_the_tune(make_cfg):
    from pipeline.data.base import list_corpus_pieces, parse_corpus_piece
    from pipeline.data.demo import excerpt_midi

    cfg = make_cfg(demo={**SMALL, "excerpt_s": 10.0})
    rel = list_corpus_pieces(["ryansMammoth"], 1, smallest_first=True)[0]
    tune, _ = parse_corpus_piece(rel, max_s=10.0)
    bare = excerpt_midi(rel, cfg.demo, cfg.demo.players["keys"]).instruments[0].notes
    played = excerpt_midi(rel, cfg.demo, cfg.demo.players["fiddle"]).instruments[0].notes
    assert len(bare) == len(tune)
    left = [n for n in played if n.pitch < min(t.pitch for t in tune)]
    assert len(played) > len(bare) and len(left) >= 5  # a bass note per bar at least
    assert max(n.velocity for n in left) < max(n.velocity for n in tune)  # softer than the tune


def test_chord_choice_follows_the_melody():
    from pipeline.data.accompany import Meter, accompany, choose_chord

    def line(*pitches: int) -> list[pretty_midi.Note]:
        return [pretty_midi.Note(80, p, i * 0.5, i * 0.5 + 0.5) for i, p in enumerate(pitches)]

    assert choose_chord(line(60, 64, 67), tonic=0, minor=False) == (0, 4)  # C E G: I
    assert choose_chord(line(65, 69, 72), tonic=0, minor=False) == (5, 4)  # F A C: IV
    assert choose_chord(line(67, 71, 74), tonic=0, minor=False) == (7, 4)  # G B D: V
    assert choose_chord(line(57, 60, 64), tonic=9, minor=True) == (9, 3)  # A C E in A minor: i
    notes = accompany(line(60, 64, 67, 72), tonic=0, minor=False, meter=Meter(beats=2, beat_s=0.5))
    bass = [n for n in notes if n.pitch < 53]
    assert [n.start for n in bass] == [0.0, 1.0] and {n.pitch % 12 for n in bass} == {0}


def test_phrase_file_leaves_rests_for_the_partner(tmp_path):
    import pretty_midi

    from pipeline.data.demo import phrase_file

    pm = pretty_midi.PrettyMIDI(initial_tempo=120.0)  # a bar is 2 s
    piano = pretty_midi.Instrument(program=0)
    piano.notes = [pretty_midi.Note(80, 60 + i % 12, 1.0 + 0.25 * i, 1.0 + 0.25 * i + 0.2) for i in range(64)]
    pm.instruments.append(piano)
    pm.write(str(tmp_path / "piece.mid"))

    n = phrase_file(tmp_path / "piece.mid", tmp_path / "phrases.mid", bars=1, rest_bars=1, count=3)
    out = pretty_midi.PrettyMIDI(str(tmp_path / "phrases.mid")).instruments[0].notes
    assert n == len(out) == 24  # 3 phrases of one 2 s bar, 8 notes each
    starts = sorted(x.start for x in out)
    assert starts[0] == pytest.approx(0.0, abs=1e-3)
    # each phrase is one bar long and followed by a bar of silence
    for k in range(3):
        phrase = [x for x in out if 4 * k <= x.start < 4 * k + 2]
        assert len(phrase) == 8 and max(x.end for x in phrase) <= 4 * k + 2 + 1e-3
        assert not [x for x in out if 4 * k + 2 <= x.start < 4 * k + 4]
