"""transcribers: Transkun on a rendered clip (notes, velocity, pedal), seamless segments, bad input, the factory."""

from __future__ import annotations

import mir_eval
import numpy as np
import pretty_midi
import pytest

import pipeline.data.transcribe as T
from pipeline.core.config import ConfigError, TranscribeConfig, load_config
from pipeline.data.transcribers import TranscriberError, make_transcriber, pick_device
from pipeline.data.transcribers.pedal import extend_through_pedal
from tests.conftest import CLIP_NOTES, make_midi, render_midi

pytest.importorskip("transkun")
FAST = {"backend": "transkun"}  # segments must stay ~16 s (its training length: 4 s segments lose most notes)


@pytest.fixture(scope="module")
def transkun():
    return make_transcriber("transkun").load_model(TranscribeConfig(**FAST), None)


def _onset_f1(ref: list[tuple[int, float, float]], est: list[pretty_midi.Note]) -> float:
    hz = lambda ps: 440.0 * 2.0 ** ((np.asarray(ps, dtype=float) - 69) / 12)  # noqa: E731
    ri = np.array([[s, e] for _, s, e in ref])
    ei = np.array([[n.start, n.end] for n in est]).reshape(-1, 2)
    _, _, f, _ = mir_eval.transcription.precision_recall_f1_overlap(
        ri, hz([p for p, _, _ in ref]), ei, hz([n.pitch for n in est]), onset_tolerance=0.05, offset_ratio=None
    )
    return f


def test_transkun_recovers_rendered_notes(piano_clip, transkun):
    wav, _ = piano_clip
    pm = T.transcribe_audio(wav, transkun, TranscribeConfig(**FAST, note_ends="key_release"))
    notes = pm.instruments[0].notes
    assert _onset_f1(CLIP_NOTES, notes) >= 0.95, [(n.pitch, round(n.start, 2)) for n in notes]
    assert all(40 <= n.velocity <= 127 for n in notes)  # rendered at velocity 90
    ends = {n.pitch: n.end for n in notes}
    assert all(abs(ends[p] - e) < 0.15 for p, _, e in CLIP_NOTES if p in ends)  # key releases


def test_note_held_across_segment_boundaries_is_one_note(tmp_path, transkun):
    # segments (16 s every 8 s, 8 s of padding first) hand over at 8 s of audio: 48 is held across it
    held = [(48, 6.0, 10.5), (64, 1.0, 1.4), (67, 7.5, 7.9), (72, 9.0, 9.4)]
    wav = render_midi(make_midi(held, tmp_path / "held.mid"), tmp_path / "held.wav")
    out = make_transcriber("transkun").transcribe(wav, transkun, TranscribeConfig(**FAST, hop_s=8.0))
    low = [n for n in out.notes if n.pitch == 48]
    assert len(low) == 1 and low[0].start == pytest.approx(6.0, abs=0.05) and low[0].end > 10.0, low
    assert _onset_f1(held, out.notes) >= 0.95


def test_batched_segments_give_transkuns_own_notes(tmp_path):
    # batch_segments=3 puts all of this clip's segments through one forward pass, and the segment that holds
    # only trailing padding is skipped; Transkun's own loop (`TransKun.transcribe`) runs every segment one by one
    import torch

    from pipeline.data.transcribers import transkun as tk

    tcfg = TranscribeConfig(**FAST, precision="float32", hop_s=8.0, batch_segments=3)  # Transkun's conf
    transkun = tk.load_model(tcfg, None)
    held = [(48, 6.0, 10.5), (64, 1.0, 1.4), (67, 7.5, 7.9), (72, 9.0, 9.4)]
    wav = render_midi(make_midi(held, tmp_path / "held.mid"), tmp_path / "held.wav")
    audio = torch.from_numpy(np.concatenate(list(tk._blocks(wav, transkun.net.fs))))[:, None]  # (samples, 1)
    with torch.inference_mode():
        theirs = transkun.net.transcribe(audio)
    ours = tk.decode(wav, transkun, tcfg, progress=False)
    ours, theirs = (sorted(events, key=lambda e: (e.pitch, e.start)) for events in (ours, theirs))
    assert [(e.pitch, e.velocity) for e in ours] == [(e.pitch, e.velocity) for e in theirs]
    for a, b in zip(ours, theirs, strict=True):  # seconds: batching changes float rounding, not the notes
        assert a.start == pytest.approx(b.start, abs=1e-4) and a.end == pytest.approx(b.end, abs=1e-4)


def test_lean_forward_is_the_shipped_model(tmp_path):
    # the attention and residual blocks through torch's fused kernels: the same arithmetic, so the same notes
    import torch

    from pipeline.data.transcribers import transkun as tk

    lean, shipped = (TranscribeConfig(**FAST, precision="float32", lean_forward=on) for on in (True, False))
    assert tk.model_id(lean) != tk.model_id(shipped)
    models = [tk.load_model(tcfg, None) for tcfg in (lean, shipped)]
    frames = torch.randn(1, 1, 200, models[0].net.windowSize, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        (crf_a, ctx_a), (crf_b, ctx_b) = (m.net.processFramesBatch(frames) for m in models)
    assert (ctx_a - ctx_b).abs().max() < 1e-3 * ctx_b.abs().max()
    assert (crf_a.score - crf_b.score).abs().max() < 1e-3 * crf_b.score.abs().max()
    held = [(48, 6.0, 10.5), (64, 1.0, 1.4), (67, 7.5, 7.9), (72, 9.0, 9.4), (60, 3.0, 3.5), (76, 3.0, 3.5)]
    wav = render_midi(make_midi(held, tmp_path / "held.mid"), tmp_path / "held.wav")
    ours, theirs = (
        sorted(tk.decode(wav, m, tcfg, progress=False), key=lambda e: (e.pitch, e.start))
        for m, tcfg in zip(models, (lean, shipped), strict=True)
    )
    assert [(e.pitch, e.velocity) for e in ours] == [(e.pitch, e.velocity) for e in theirs]
    for a, b in zip(ours, theirs, strict=True):
        assert a.start == pytest.approx(b.start, abs=1e-3) and a.end == pytest.approx(b.end, abs=1e-3)


def test_bfloat16_keeps_the_notes_and_its_own_cache_key(piano_clip):
    wav, _ = piano_clip
    tcfg = TranscribeConfig(**FAST, precision="bfloat16", note_ends="key_release")
    tk = make_transcriber("transkun")
    assert tk.model_id(tcfg) != tk.model_id(TranscribeConfig(**FAST, precision="float32"))  # notes differ slightly
    pm = T.transcribe_audio(wav, tk.load_model(tcfg, None), tcfg, tk)
    assert _onset_f1(CLIP_NOTES, pm.instruments[0].notes) >= 0.95


def test_sounding_ends_follow_the_pedal():
    notes = [pretty_midi.Note(80, 60, 0.0, 0.5), pretty_midi.Note(80, 60, 1.5, 1.8), pretty_midi.Note(70, 64, 2.0, 2.2)]
    pedal = [pretty_midi.ControlChange(64, 127, 0.2), pretty_midi.ControlChange(64, 0, 3.0)]
    out = extend_through_pedal(notes, pedal)
    assert [(n.start, n.end, n.velocity) for n in out] == [(0.0, 1.5, 80), (1.5, 3.0, 80), (2.0, 3.0, 70)]
    assert extend_through_pedal(notes, [])[0].end == 0.5


def test_unknown_backend_and_bad_values_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"transcribe\.backend"):
        make_transcriber("whisper")
    params = tmp_path / "p.yaml"
    params.write_text("transcribe:\n  backend: whisper\n")
    with pytest.raises(ConfigError, match=r"transcribe\.backend"):
        load_config(params)


def test_cuda_absent_is_a_clear_error(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match=r"transcribe\.device: cuda"):
        pick_device("cuda")
    assert pick_device("auto") == "cpu"


def test_weights_failing_to_load_is_a_clear_error(monkeypatch):
    from pipeline.data.transcribers import transkun as tk

    monkeypatch.setattr(tk, "WEIGHTS", "pretrained/missing.pt")
    with pytest.raises(TranscriberError, match="transkun weights failed to load"):
        tk.load_model(TranscribeConfig(), None)


def test_too_short_audio(tmp_path, transkun):
    import soundfile as sf

    short = tmp_path / "short.wav"
    sf.write(str(short), np.zeros(2205, dtype=np.float32), 22050)
    with pytest.raises(TranscriberError, match=r"audio too short: 0\.10 s"):
        make_transcriber("transkun").transcribe(short, transkun, TranscribeConfig(**FAST))


def test_precision_auto_takes_bfloat16_only_where_the_cpu_computes_it(monkeypatch, tmp_path):
    from pipeline.data.transcribers import transkun as tk

    assert tk.precision(TranscribeConfig(precision="float32")) == "float32"
    assert tk.precision(TranscribeConfig(precision="bfloat16")) == "bfloat16"
    cpuinfo = tmp_path / "cpuinfo"
    monkeypatch.setattr("pipeline.core.device.CPUINFO", cpuinfo)
    auto = TranscribeConfig(precision="auto", device="cpu")
    cpuinfo.write_text("flags\t: fpu sse avx2 avx512f avx512_bf16 amx_tile\n")
    assert tk.precision(auto) == "bfloat16" and "/bf16" in tk.model_id(auto)
    cpuinfo.write_text("flags\t: fpu sse avx2 avx512f\n")  # bfloat16 would be emulated: slower than float32
    assert tk.precision(auto) == "float32" and "/bf16" not in tk.model_id(auto)
