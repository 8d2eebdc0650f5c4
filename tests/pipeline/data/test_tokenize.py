"""Tokenize stage: round trip, shared BPE trained once, per-piece cache, windows, split separation, failures."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import miditok
import numpy as np
import pytest
from symusic import Note, Score, Track

from pipeline.core.config import config_from_dict
from pipeline.core.graph import run_stage
from pipeline.core.items import AllItemsFailed
from pipeline.data.tokenize import (
    TOKENIZER_NAME,
    decode_ids,
    encode_score,
    load_piano_score,
    load_tokenizer,
    make_tokenizer,
    roundtrip_counts,
)
from pipeline.data.windows import window_ids

TPQ = 480
# Distinctive pitch sets per piece: windows can be traced back to the pieces they came from.
STYLE = {"alpha": ("train", range(40, 46)), "beta": ("train", range(50, 56)),
         "gamma": ("valid", range(70, 73)), "delta": ("test", range(80, 85))}  # fmt: skip
BASE = {"bach1": ("train", range(60, 66)), "bach2": ("train", range(62, 68)),
        "bach3": ("valid", range(90, 93)), "bach4": ("test", range(95, 98))}  # fmt: skip
AUG_SHIFTS = (0, -1, 1)  # semitones; "__a0" is the original


def write_piece(
    path: Path, pitches: range, n_notes: int = 24, seed: int = 0, tracks: int = 1, cycle: bool = False
) -> None:
    """A small unquantized one-pianist MIDI: onsets and durations off the 1/8-beat grid.

    `cycle` walks the pitches in order, so (with 24 of them) two notes of one pitch never overlap.
    """
    rng = np.random.default_rng(seed)
    score = Score(TPQ)
    parts = [Track(name=f"part{k}", program=0) for k in range(tracks)]
    tick = 0
    for i in range(n_notes):
        tick += int(rng.integers(50, 500))
        pitch = pitches[i % len(pitches)] if cycle else int(rng.choice(list(pitches)))
        note = Note(tick, int(rng.integers(60, 900)), pitch, int(rng.integers(20, 120)))
        parts[i % tracks].notes.append(note)
    score.tracks.extend(parts)
    path.parent.mkdir(parents=True, exist_ok=True)
    score.dump_midi(str(path))


def make_corpus(data: Path) -> None:
    """clean/, augment/ and split/ as the upstream stages would leave them."""
    split: dict[str, dict[str, list[str]]] = {c: {"train": [], "valid": [], "test": []} for c in ("style", "base")}
    for corpus, pieces in (("style", STYLE), ("base", BASE)):
        for seed, (pid, (part, pitches)) in enumerate(pieces.items()):
            write_piece(data / "clean" / corpus / f"{pid}.mid", pitches, seed=seed, tracks=1 + seed % 2)
            split[corpus][part].append(pid)
            if corpus == "style" and part == "train":
                for k, shift in enumerate(AUG_SHIFTS):
                    shifted = range(pitches.start + shift, pitches.stop + shift)
                    write_piece(data / "augment" / "midi" / f"{pid}__a{k}.mid", shifted, seed=seed)
    write_split(data, {"base": split["base"], "styles": {"solo": split["style"]}})


def write_split(data: Path, split: dict) -> None:
    (data / "split").mkdir(parents=True, exist_ok=True)
    (data / "split" / "split.json").write_text(json.dumps(split))


def tiny_config(data: Path, **tokenize):
    params = {"vocab_size": 420, "num_velocities": 8, "max_seq_len": 32, "overlap": 8, **tokenize}
    return config_from_dict({"project": {"data_dir": str(data)}, "tokenize": params})


def pitches_in(tokenizer: miditok.MusicTokenizer, windows: np.ndarray, specials: set[int]) -> set[int]:
    """Every NoteOn pitch appearing in some window (BPE ids decoded back to base tokens)."""
    found = set()
    for row in windows:
        seq = miditok.TokSequence(ids=[int(i) for i in row if i not in specials], are_ids_encoded=True)
        tokenizer.decode_token_ids(seq)  # fills seq.tokens with base tokens
        found |= {int(t.split("_")[1]) for t in seq.tokens if t.startswith("NoteOn_")}
    return found


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """One full run shared by the read-only tests (BPE training is the slow part)."""
    data = tmp_path_factory.mktemp("tok") / "data"
    make_corpus(data)
    cfg = tiny_config(data)
    return cfg, run_stage("tokenize", cfg)


# ---------------------------------------------------------------- per piece


@pytest.mark.parametrize("trained", [False, True])
def test_roundtrip_keeps_notes_within_quantization(tmp_path, built, trained):
    write_piece(tmp_path / "p.mid", range(48, 72), n_notes=40, seed=7, tracks=2, cycle=True)
    score = load_piano_score(tmp_path / "p.mid")
    assert len(score.tracks) == 1 and len(score.tracks[0].notes) == 40  # two parts merged into one stream
    cfg, _ = built
    tok = load_tokenizer(cfg.stage_dir("tokenize") / TOKENIZER_NAME) if trained else make_tokenizer(cfg.tokenize)
    ids = encode_score(tok, score)
    decoded = decode_ids(tok, ids)
    counts = roundtrip_counts(tok, score, decoded)
    assert counts == {"notes": 40, "matched": 40, "onsets_matched": 40}
    orig = sorted((n.pitch, n.time / TPQ) for n in score.tracks[0].notes)
    back = sorted((n.pitch, n.time / decoded.ticks_per_quarter) for n in decoded.tracks[0].notes)
    step = 1 / 8  # finest grid step of the default beat_res, in beats
    for (p0, t0), (p1, t1) in zip(orig, back, strict=True):
        assert p0 == p1 and abs(t0 - t1) <= step / 2 + 1e-9


def test_overlapping_notes_of_one_pitch_keep_their_onsets(tmp_path):
    score = Score(TPQ)
    score.tracks.append(Track(program=0))
    score.tracks[0].notes.extend([Note(0, 960, 60, 80), Note(240, 240, 60, 80), Note(480, 480, 64, 80)])
    tok = make_tokenizer(tiny_config(tmp_path).tokenize)
    counts = roundtrip_counts(tok, score, decode_ids(tok, encode_score(tok, score)))
    # One MIDI channel cannot tell which C4 a NoteOff ends: durations may change, onsets may not.
    assert counts["onsets_matched"] == 3 and counts["matched"] >= 1


def test_roundtrip_check_catches_a_bad_decode(tmp_path):
    write_piece(tmp_path / "p.mid", range(48, 72), seed=3)
    tok = make_tokenizer(tiny_config(tmp_path).tokenize)
    score = load_piano_score(tmp_path / "p.mid")
    decoded = decode_ids(tok, encode_score(tok, score))
    shifted = decoded.shift_time(decoded.ticks_per_quarter // 2)  # half a beat late: every onset is wrong
    assert roundtrip_counts(tok, score, shifted)["matched"] == 0


def test_load_tokenizer_reads_kind(tmp_path):
    tok = make_tokenizer(tiny_config(tmp_path, kind="TSD").tokenize)
    tok.save(tmp_path / "t.json")
    assert isinstance(load_tokenizer(tmp_path / "t.json"), miditok.TSD)


@pytest.mark.parametrize(
    ("n", "expected"), [(10, 1), (32, 1), (33, 2), (56, 2), (57, 3), (100, 4)]
)  # L=32, overlap=8 -> stride 24: 1 + ceil((n - 32) / 24)
def test_window_shapes_overlap_and_padding(n, expected):
    ids = np.arange(100, 100 + n, dtype=np.int32)
    win = window_ids(ids, max_seq_len=32, overlap=8, pad_id=0)
    assert win.shape == (expected, 32) and win.dtype == np.int32
    for a, b in itertools.pairwise(win):
        assert np.array_equal(a[-8:], b[:8])
    rebuilt = np.concatenate([win[0]] + [w[8:] for w in win[1:]])
    assert np.array_equal(rebuilt[:n], ids) and np.all(rebuilt[n:] == 0)


# ---------------------------------------------------------------- driver


def test_run_writes_windows_and_report(built):
    cfg, report = built
    out = cfg.stage_dir("tokenize")
    stats = report.stats
    assert stats["kind"] == "MIDILike" and stats["bpe_trained"] is True
    assert (stats["pad_id"], stats["bos_id"], stats["eos_id"]) == (0, 1, 2)
    assert stats["roundtrip_onset_match"] == 1.0  # durations of overlapping same-pitch notes may differ
    assert stats["roundtrip_note_match"] > 0.9
    lengths = stats["note_lengths"]  # the note-ending rule's limit: a high quantile of the train notes' lengths
    assert lengths["notes"] > 0 and lengths["quantile"] == 0.995
    assert 0 < lengths["p50_beats"] <= lengths["max_note_beats"] <= lengths["longest_beats"]
    poly = stats["polyphony"]  # the polyphony rule's limit: the same quantile of the notes sounding at an onset
    assert poly["onsets"] > 0 and poly["quantile"] == 0.995
    assert 1 <= poly["p50"] <= poly["max_polyphony"] <= poly["most"]
    base_vocab = len(make_tokenizer(cfg.tokenize))
    assert base_vocab < stats["vocab_size"] <= 420
    for corpus in ("style/solo", "base"):
        for split in ("train", "valid", "test"):
            arr = np.load(out / corpus / f"{split}.npy")
            assert arr.dtype == np.int32 and arr.shape[1] == 32 and len(arr) >= 1
            assert arr.shape[0] == stats["splits"][f"{corpus}/{split}"]["windows"]
            assert arr[0, 0] == stats["bos_id"] and arr.max() < stats["vocab_size"]
    assert stats["splits"]["style/solo/train"]["pieces"] == 2 * len(AUG_SHIFTS)  # augmented copies, not clean files
    assert json.loads((out / "report.json").read_text())["stats"]["vocab_size"] == stats["vocab_size"]


def test_splits_do_not_leak(built):
    cfg, report = built
    out, stats = cfg.stage_dir("tokenize"), report.stats
    tok = load_tokenizer(out / TOKENIZER_NAME)
    specials = {stats["pad_id"], stats["bos_id"], stats["eos_id"]}
    train = pitches_in(tok, np.load(out / "style" / "solo" / "train.npy"), specials)
    assert train <= set(range(39, 47)) | set(range(49, 57))  # alpha/beta and their +-1 copies only
    assert pitches_in(tok, np.load(out / "style" / "solo" / "test.npy"), specials) <= set(range(80, 85))
    assert pitches_in(tok, np.load(out / "base" / "train.npy"), specials) <= set(range(60, 68))


def test_second_run_reuses_bpe_and_cache(built):
    cfg, first = built
    tok_path = cfg.stage_dir("tokenize") / TOKENIZER_NAME
    before = (tok_path.stat().st_mtime_ns, tok_path.read_bytes())
    again = run_stage("tokenize", cfg)
    assert again.stats["bpe_trained"] is False and not again.processed
    assert sorted(again.cached) == sorted(first.processed)
    assert (tok_path.stat().st_mtime_ns, tok_path.read_bytes()) == before
    assert again.stats["tokenizer_sha256"] == first.stats["tokenizer_sha256"]


def test_window_params_do_not_retrain_but_vocab_params_do(tmp_path):
    data = tmp_path / "data"
    make_corpus(data)
    first = run_stage("tokenize", tiny_config(data))
    longer = run_stage("tokenize", tiny_config(data, max_seq_len=64, overlap=16))
    assert longer.stats["bpe_trained"] is False and not longer.processed  # ids cached, only re-windowed
    assert np.load(data / "tokenize" / "base" / "train.npy").shape[1] == 64
    bigger = run_stage("tokenize", tiny_config(data, vocab_size=440))
    assert bigger.stats["bpe_trained"] is True and sorted(bigger.processed) == sorted(first.processed)


def test_adding_a_piece_encodes_only_that_one(tmp_path):
    data = tmp_path / "data"
    make_corpus(data)
    cfg = tiny_config(data)
    run_stage("tokenize", cfg)
    write_piece(data / "clean" / "base" / "bach5.mid", range(30, 33), seed=11)
    split = json.loads((data / "split" / "split.json").read_text())
    split["base"]["train"].append("bach5")
    write_split(data, split)
    report = run_stage("tokenize", cfg)
    assert report.processed == ["base/bach5"] and report.stats["bpe_trained"] is False
    assert report.stats["splits"]["base/train"]["pieces"] == 3


def test_corrupt_midi_is_a_per_item_failure(tmp_path):
    data = tmp_path / "data"
    make_corpus(data)
    (data / "clean" / "base" / "broken.mid").write_bytes(b"MThd not really a midi file")
    split = json.loads((data / "split" / "split.json").read_text())
    split["base"]["train"].append("broken")
    write_split(data, split)
    report = run_stage("tokenize", tiny_config(data))
    assert list(report.failed) == ["base/broken"] and "unreadable MIDI" in report.failed["base/broken"]
    assert report.stats["splits"]["base/train"]["pieces"] == 2
    again = run_stage("tokenize", tiny_config(data))  # same bytes: not retried, still reported
    assert "base/broken" in again.cached and list(again.failed) == ["base/broken"]


def test_piece_without_tokens_fails_clearly(tmp_path):
    data = tmp_path / "data"
    make_corpus(data)
    write_piece(data / "clean" / "base" / "subsonic.mid", range(5, 10))  # below the piano's range
    split = json.loads((data / "split" / "split.json").read_text())
    split["base"]["valid"].append("subsonic")
    write_split(data, split)
    report = run_stage("tokenize", tiny_config(data))
    assert "no tokens" in report.failed["base/subsonic"]


def test_empty_style_train_is_a_clear_error(tmp_path):
    data = tmp_path / "data"
    make_corpus(data)
    split = json.loads((data / "split" / "split.json").read_text())
    split["styles"]["solo"]["train"] = []
    write_split(data, split)
    with pytest.raises(ValueError, match=r"no train pieces for style\(s\) \['solo'\]"):
        run_stage("tokenize", tiny_config(data))


def test_no_train_data_for_bpe_is_a_clear_error(tmp_path):
    data = tmp_path / "data"
    (data / "clean" / "style").mkdir(parents=True)
    (data / "clean" / "style" / "x.mid").write_bytes(b"garbage")
    write_split(data, {"styles": {"solo": {"train": ["x"], "valid": [], "test": []}}, "base": {}})
    with pytest.raises(ValueError, match=r"gave tokens to learn BPE from.*unreadable MIDI"):
        run_stage("tokenize", tiny_config(data))
    assert not (data / "tokenize" / TOKENIZER_NAME).exists()  # nothing learned from nothing is kept


def test_every_item_failing_raises(tmp_path):
    data = tmp_path / "data"
    make_corpus(data)
    cfg = tiny_config(data)
    run_stage("tokenize", cfg)
    for path in (data / "clean").rglob("*.mid"):
        path.write_bytes(b"garbage")
    for path in (data / "augment").rglob("*.mid"):
        path.write_bytes(b"garbage")
    with pytest.raises(AllItemsFailed, match="unreadable MIDI"):
        run_stage("tokenize", cfg)  # the tokenizer is kept (same vocabulary params); every piece fails
    assert np.load(data / "tokenize" / "base" / "test.npy").shape == (0, 32)  # emptied, not left stale


def test_each_style_gets_its_own_windows(tmp_path):
    data = tmp_path / "data"
    make_corpus(data)
    split = json.loads((data / "split" / "split.json").read_text())
    solo = split["styles"].pop("solo")
    split["styles"] = {"low": {**solo, "train": ["alpha"]}, "high": {"train": ["beta"], "valid": [], "test": []}}
    write_split(data, split)
    report = run_stage("tokenize", tiny_config(data))
    out, stats = data / "tokenize", report.stats
    tok = load_tokenizer(out / TOKENIZER_NAME)
    specials = {stats["pad_id"], stats["bos_id"], stats["eos_id"]}
    assert pitches_in(tok, np.load(out / "style" / "low" / "train.npy"), specials) <= set(range(39, 47))
    assert pitches_in(tok, np.load(out / "style" / "high" / "train.npy"), specials) <= set(range(49, 57))
    assert stats["splits"]["style/high/test"]["windows"] == 0 and stats["splits"]["style/low/test"]["windows"] > 0


def test_windows_are_streamed_into_the_bytes_np_save_writes(tmp_path):
    from pipeline.core.config import TokenizeConfig
    from pipeline.data.windows import _framed, _write_split, n_windows

    rng = np.random.default_rng(0)
    seqs = []
    for i, n in enumerate((5, 30, 31, 200)):  # shorter than, equal to and many times the window
        seqs.append(tmp_path / f"{i}.npy")
        np.save(seqs[-1], rng.integers(3, 400, n).astype(np.int32))
    tc, ids = TokenizeConfig(max_seq_len=32, overlap=8), {"pad_id": 0, "bos_id": 1, "eos_id": 2}
    counts = _write_split(tmp_path / "streamed.npy", seqs, tc, ids)
    whole = np.concatenate([window_ids(_framed(np.load(p), ids), 32, 8, 0) for p in seqs])
    np.save(tmp_path / "whole.npy", whole)  # what the stage wrote before: the split's windows in memory at once
    assert (tmp_path / "streamed.npy").read_bytes() == (tmp_path / "whole.npy").read_bytes()
    assert counts["windows"] == len(whole) == sum(n_windows(len(np.load(p)) + 2, 32, 8) for p in seqs)
    assert _write_split(tmp_path / "empty.npy", [], tc, ids)["windows"] == 0
    assert np.load(tmp_path / "empty.npy").shape == (0, 32)
