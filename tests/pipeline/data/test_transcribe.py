"""transcribe (Basic Pitch backend, fast): rendered notes; per-item caching, pruning, bad audio, MIDI pass-through."""

from __future__ import annotations

import shutil
from pathlib import Path

import mir_eval
import numpy as np
import pretty_midi
import pytest

import pipeline.data.transcribe as T
from pipeline.core.config import TranscribeConfig
from pipeline.core.files import sha256_file
from pipeline.core.graph import run_stage
from pipeline.data import tempo
from pipeline.data.acquire import write_manifest
from pipeline.data.transcribers import make_transcriber
from tests.conftest import CLIP_NOTES, make_midi, render_midi

BP = {"backend": "basic_pitch"}  # the fast backend for the driver's tests; Transkun: test_transcribers.py


@pytest.fixture(scope="module")
def model():
    return make_transcriber("basic_pitch").load_model(TranscribeConfig(**BP), None)


def _stage(cfg, items: dict[str, Path], styles: dict[str, str] | None = None) -> None:
    """Place files as acquire would (audio/<id>.wav, midi/<id>.mid) and write the manifest (item -> style)."""
    acq, rows = cfg.stage_dir("acquire"), []
    for item_id, src in items.items():
        kind = "midi" if src.suffix == ".mid" else "audio"
        dest = acq / kind / f"{item_id}{src.suffix}"
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dest)
        row = {"id": item_id, "kind": kind, "source": str(src), "sha256": sha256_file(dest)}
        rows.append({**row, "style": styles[item_id]} if styles else row)
    write_manifest(rows, acq)


def test_a_style_may_name_its_own_transcriber(tmp_path, make_cfg, piano_clip, monkeypatch):
    wav, _ = piano_clip
    styles = {"rendered": {"sources": ["a"], "transcriber": "basic_pitch"}, "recorded": {"sources": ["b"]}}
    cfg = make_cfg(styles=styles)  # transcribe.backend: transkun, the default
    assert cfg.transcribe.backend == "transkun"
    assert T.style_transcribe(cfg, "rendered").backend == "basic_pitch"
    assert T.style_transcribe(cfg, "recorded") is cfg.transcribe and T.style_transcribe(cfg, None) is cfg.transcribe
    _stage(cfg, {"demo": wav}, styles={"demo": "rendered"})
    loaded: list[str] = []
    real = T._load
    monkeypatch.setattr(T, "_load", lambda tcfg: loaded.append(tcfg.backend) or real(tcfg))
    report = run_stage("transcribe", cfg)
    assert report.processed == ["demo"] and loaded == ["basic_pitch"]  # Transkun never loaded: nothing needed it


def _silence(path: Path, seconds: float = 2.0) -> Path:
    import soundfile as sf

    sf.write(str(path), np.zeros(int(22050 * seconds), dtype=np.float32), 22050)
    return path


def _notes(pm: pretty_midi.PrettyMIDI) -> list[pretty_midi.Note]:
    return [n for inst in pm.instruments for n in inst.notes]


def test_transcribe_audio_recovers_rendered_notes(piano_clip, model):
    wav, _ = piano_clip
    pm = T.transcribe_audio(wav, model, TranscribeConfig(**BP))
    assert len(pm.instruments) == 1 and pm.instruments[0].program == 0
    est = _notes(pm)
    ref_on = np.array([[s, e] for _, s, e in CLIP_NOTES])
    ref_hz = _hz([p for p, _, _ in CLIP_NOTES])
    est_on = np.array([[n.start, n.end] for n in est])
    _, recall, _, _ = mir_eval.transcription.precision_recall_f1_overlap(
        ref_on, ref_hz, est_on, _hz([n.pitch for n in est]), onset_tolerance=0.05, offset_ratio=None
    )
    assert recall >= 0.75, [(n.pitch, round(n.start, 2)) for n in est]
    assert len({p for p, _, _ in CLIP_NOTES} - {n.pitch for n in est}) <= 1
    assert 60 <= pm.get_tempo_changes()[1][0] <= 180


def _hz(pitches: list[int]) -> np.ndarray:
    return 440.0 * 2.0 ** ((np.asarray(pitches, dtype=float) - 69) / 12)


def test_pitch_range_and_default_tempo(piano_clip, model):
    wav, _ = piano_clip
    tcfg = TranscribeConfig(**BP, min_pitch=64, max_pitch=70, estimate_tempo=False, default_tempo=97.0)
    pm = T.transcribe_audio(wav, model, tcfg)
    assert all(64 <= n.pitch <= 70 for n in _notes(pm)) and _notes(pm)
    assert pm.get_tempo_changes()[1][0] == pytest.approx(97.0)


def test_tempo_estimate_and_folding():
    import librosa

    clicks = librosa.clicks(times=np.arange(0, 8, 0.5), sr=22050, length=22050 * 8)  # 120 BPM
    assert abs(T.estimate_tempo(clicks, 22050, default=90.0) - 120) < 5
    assert T.estimate_tempo(np.zeros(22050, dtype=np.float32), 22050, default=111.0) == 111.0  # no beats found
    folded = [tempo.fold_tempo(b, 100.0) for b in (300.0, 40.0, 700.0, 150.0, 0.0, float("nan"))]
    assert folded == [150.0, 80.0, 175.0, 150.0, 100.0, 100.0]


def test_notes_are_heard_at_their_pulse_not_their_note_values():
    # half notes every 0.5 s and a louder one every 1 s: 120 BPM heard, whatever the score wrote the notes as
    onsets = np.arange(0, 16, 0.5)
    loud = np.where(np.arange(len(onsets)) % 2 == 0, 1.0, 0.6)
    assert abs(tempo.notes_tempo(onsets, loud, default=90.0) - 120) < 5
    assert tempo.notes_tempo([1.0], [1.0], default=77.0) == 77.0  # one onset: nothing to track


def test_silent_audio_is_a_per_item_error(tmp_path, make_cfg, piano_clip):
    wav, _ = piano_clip
    silent = _silence(tmp_path / "silent.wav")
    cfg = make_cfg(transcribe=BP)
    _stage(cfg, {"good": wav, "quiet": silent, "void": _silence(tmp_path / "void.wav", seconds=0.0)})
    report = run_stage("transcribe", cfg)
    assert report.processed == ["good"]
    assert report.failed == {
        "quiet": "no notes detected — silent or non-piano audio?",
        "void": "audio too short: 0.00 s (transcribe.min_audio_s = 1.0 s)",
    }
    assert not (cfg.stage_dir("transcribe") / "midi" / "quiet.mid").exists()
    assert report.stats["notes_per_item"]["good"] >= 6 and report.stats["x_realtime"] > 0


def test_cached_rerun_new_item_and_prune(tmp_path, make_cfg, piano_clip, monkeypatch):
    wav, truth = piano_clip
    cfg = make_cfg(transcribe=BP)
    _stage(cfg, {"a": wav, "score": truth})
    first = run_stage("transcribe", cfg)
    assert first.processed == ["a", "score"]

    calls: list[str] = []
    real = T.transcribe_audio
    monkeypatch.setattr(T, "transcribe_audio", lambda path, *a: calls.append(Path(path).stem) or real(path, *a))
    second = run_stage("transcribe", cfg)
    assert second.processed == [] and sorted(second.cached) == ["a", "score"] and calls == []

    other = render_midi(make_midi([(55, 0.0, 0.6), (59, 0.6, 1.2)], tmp_path / "b.mid"), tmp_path / "b.wav")
    _stage(cfg, {"a": wav, "score": truth, "b": other})
    third = run_stage("transcribe", cfg)
    assert third.processed == ["b"] and calls == ["b"]

    _stage(cfg, {"b": other})
    fourth = run_stage("transcribe", cfg)
    assert fourth.cached == ["b"] and sorted(fourth.stats["pruned"]) == ["a", "score"]
    assert sorted(p.name for p in (cfg.stage_dir("transcribe") / "midi").iterdir()) == ["b.mid"]

    changed = make_cfg(transcribe={**BP, "onset_threshold": 0.7})
    assert run_stage("transcribe", changed).processed == ["b"]  # new params: transcribed again


def test_midi_source_passes_through_as_one_piano_track(tmp_path, make_cfg):
    pm = pretty_midi.PrettyMIDI(initial_tempo=90.0)
    strings = pretty_midi.Instrument(program=48)
    strings.notes = [pretty_midi.Note(velocity=80, pitch=60, start=0.0, end=1.0)]
    drums = pretty_midi.Instrument(program=0, is_drum=True)
    drums.notes = [pretty_midi.Note(velocity=80, pitch=36, start=0.0, end=0.1)]
    lead = pretty_midi.Instrument(program=73)
    lead.notes = [pretty_midi.Note(velocity=70, pitch=72, start=0.5, end=1.5)]
    pm.instruments = [strings, drums, lead]
    src = tmp_path / "band.mid"
    pm.write(str(src))
    cfg = make_cfg(transcribe=BP)
    _stage(cfg, {"band": src})
    assert run_stage("transcribe", cfg).processed == ["band"]
    out = pretty_midi.PrettyMIDI(str(cfg.stage_dir("transcribe") / "midi" / "band.mid"))
    assert [(i.program, i.is_drum) for i in out.instruments] == [(0, False)]
    assert [(n.pitch, round(n.start, 3)) for n in out.instruments[0].notes] == [(60, 0.0), (72, 0.5)]
    assert out.get_tempo_changes()[1][0] == pytest.approx(90.0, abs=0.01)  # tempo map kept


def test_parallel_workers(tmp_path, make_cfg, piano_clip):
    wav, _ = piano_clip
    silent = _silence(tmp_path / "silent.wav")
    cfg = make_cfg(project={"workers": 2}, transcribe=BP)
    _stage(cfg, {"one": wav, "two": wav, "quiet": silent})
    report = run_stage("transcribe", cfg)
    assert report.processed == ["one", "two"] and list(report.failed) == ["quiet"]
    assert report.stats["notes_per_item"]["one"] == report.stats["notes_per_item"]["two"]
