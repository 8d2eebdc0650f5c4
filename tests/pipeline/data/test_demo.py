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

SMALL = {"composers": ["chopin", "joplin"], "max_pieces": 2, "excerpt_s": 4.0, "sample_rate": 16000}
IDS = ["chopin-mazurka06-2", "joplin-maple-leaf-rag"]


def test_demo_and_base_composers_must_differ():
    with pytest.raises(ConfigError, match=r"demo\.composers and base\.composers"):
        config_from_dict({"demo": {"composers": ["bach", "chopin"]}})
    config_from_dict({"demo": {"composers": ["bach"], "enabled": False}})  # no demo: no clash


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
    fewer = cfg.model_copy(update={"demo": cfg.demo.model_copy(update={"max_pieces": 1})})
    with pytest.warns(UserWarning):
        report = run_stage("demo", fewer)
    assert report.cached == ["chopin-mazurka06-2"] and report.outputs == 2
    assert not (cfg.stage_dir("demo") / "audio/joplin-maple-leaf-rag.wav").exists()


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
