"""Tokenize stage: one shared BPE vocabulary, cached per-piece ids, fixed-length training windows.

Why MIDILike by default: its NoteOn / NoteOff / TimeShift events come in the order they happen on a MIDI wire.
The real-time runner can append a human's notes as they arrive (a NoteOff when the key is released) and send the
model's NoteOn/NoteOff as they are generated, with no need to know a note's duration at its onset, which TSD and
REMI (a Duration token right after the pitch) require. TSD/REMI/Structured remain selectable via `tokenize.kind`.

Outputs under `data/tokenize/`:
  tokenizer.json          miditok params with the trained BPE model (`load_tokenizer` reads it back)
  vocab.json              hash of the params that define the vocabulary, BPE training files and seconds
  cache/<corpus>/<id>.npy int32 ids of one piece (no BOS/EOS), keyed by MIDI sha256 + tokenizer.json sha256
  base/<split>.npy        int32 (n_windows, max_seq_len): BOS + ids + EOS per piece, cut into overlapping
  style/<name>/<split>.npy  windows, the last one padded with PAD; a piece's windows are contiguous
BPE is trained once on base train + every style's train, so the base model and every fine-tune share one vocabulary;
it is retrained only when the vocabulary params change (a retrain invalidates trained models), never for new pieces.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass
from pathlib import Path

import miditok
import numpy as np
from symusic import Score, Track

from pipeline.core import constants as C
from pipeline.core.config import Config, ProjectConfig, TokenizeConfig, section_json
from pipeline.core.files import (
    atomic_path,
    piece_id,
    read_json,
    sha256_file,
    sha256_text,
    write_json,
)
from pipeline.core.items import ItemIndex, ItemResult, Job, StageReport, raise_if_all_failed, run_jobs
from pipeline.data.note_lengths import length_counts, length_stats, merge_counts, polyphony_counts, polyphony_stats
from pipeline.data.roundtrip import roundtrip_counts
from pipeline.data.split import load_split, style_splits
from pipeline.data.windows import write_windows
from realtime.bundle_format import SPECIAL_TOKENS, load_tokenizer, special_ids  # one loader, one id convention

STAGE_VERSION = "3"  # bump when the per-piece encoding or its stats change, to invalidate the cache (3: polyphony)
TOKENIZER_NAME = "tokenizer.json"
VOCAB_META_NAME = "vocab.json"
CACHE_DIR = "cache"
WINDOW_FIELDS = ("max_seq_len", "overlap")  # TokenizeConfig fields that do not change the vocabulary
TOKENIZER_KINDS = {
    "MIDILike": miditok.MIDILike,
    "TSD": miditok.TSD,
    "REMI": miditok.REMI,
    "Structured": miditok.Structured,
}


@dataclass(frozen=True)
class Item:
    """One MIDI file feeding one (corpus, split); a style corpus item names its style."""

    corpus: str
    split: str
    item_id: str
    path: Path
    style: str | None = None

    @property
    def key(self) -> str:
        return f"{self.corpus}/{self.item_id}"


# ---------------------------------------------------------------- tokenizer


def make_tokenizer(tc: TokenizeConfig) -> miditok.MusicTokenizer:
    """An untrained miditok tokenizer of kind `tc.kind` for one piano track (no program, tempo or meter tokens)."""
    beat_res = {tuple(int(b) for b in k.split("_")): res for k, res in tc.beat_res.items()}
    config = miditok.TokenizerConfig(
        pitch_range=(C.PIANO_MIN_PITCH, C.PIANO_MAX_PITCH + 1),
        beat_res=beat_res,
        num_velocities=tc.num_velocities,
        special_tokens=list(SPECIAL_TOKENS),
        use_sustain_pedals=tc.use_sustain_pedals,
        use_programs=False,
        # A live player gives no meter or tempo map: time is counted in quarter-note beats, bars assumed 4/4.
        use_time_signatures=False,
        use_tempos=False,
        remove_duplicated_notes=True,  # two voices on one key are one piano key
        encode_ids_split=tc.encode_ids_split,
    )
    return TOKENIZER_KINDS[tc.kind](config)


def vocab_hash(tc: TokenizeConfig) -> str:
    """Hash of the params that define the vocabulary (all but the windowing ones)."""
    params = {k: v for k, v in json.loads(section_json(tc)).items() if k not in WINDOW_FIELDS}
    return sha256_text(json.dumps(params, sort_keys=True))


class _BPEIterator(miditok.TokTrainingIterator):
    """Training text for BPE: the same merged piano track we encode, capped per file to bound training time."""

    def __init__(self, tokenizer: miditok.MusicTokenizer, files_paths: list[Path], max_tokens: int):
        super().__init__(tokenizer, files_paths)
        self.max_tokens = max_tokens
        self.used: set[Path] = set()  # files that gave tokens
        self.first_error = ""

    def load_file(self, path: Path) -> list[str]:
        try:
            seqs = self.tokenizer.encode(load_piano_score(path), encode_ids=False)
        except Exception as err:  # reported per item when the file is encoded; here it just adds nothing
            self.first_error = self.first_error or f"{Path(path).name}: {err}"
            return []
        chunks = [c.ids for seq in _as_list(seqs) for c in _split_for_bpe(self.tokenizer, seq)]
        starts = np.cumsum([0] + [len(c) for c in chunks[:-1]])  # base tokens before each chunk
        chunks = [c for c, start in zip(chunks, starts, strict=True) if start < self.max_tokens]
        if chunks:
            self.used.add(Path(path))
        return self.tokenizer._ids_to_bytes(chunks, as_one_str=True) if chunks else []


def _as_list(seqs: miditok.TokSequence | list[miditok.TokSequence]) -> list[miditok.TokSequence]:
    return seqs if isinstance(seqs, list) else [seqs]  # one-stream tokenizers return a bare sequence


def _split_for_bpe(tokenizer: miditok.MusicTokenizer, seq: miditok.TokSequence) -> list[miditok.TokSequence]:
    split = tokenizer.config.encode_ids_split
    parts = seq.split_per_bars() if split == "bar" else seq.split_per_beats() if split == "beat" else [seq]
    return [p for p in parts if len(p) > 0]


def train_bpe(tokenizer: miditok.MusicTokenizer, paths: list[Path], tc: TokenizeConfig, seed: int) -> dict:
    """Train BPE in place on a seeded sample of `paths`. Returns what was trained on and how long it took.

    Raises:
        ValueError: no sampled file gave tokens (a vocabulary learned from nothing would be kept for good).
    """
    sample = sorted(paths)
    if len(sample) > tc.bpe_max_files:
        sample = sorted(random.Random(seed).sample(sample, tc.bpe_max_files))
    started = time.perf_counter()
    if tc.vocab_size > len(tokenizer):
        iterator = _BPEIterator(tokenizer, sample, tc.bpe_max_tokens_per_file)
        tokenizer.train(vocab_size=tc.vocab_size, model="BPE", iterator=iterator)
        if not iterator.used:
            raise ValueError(
                f"tokenize: none of {len(sample)} train files gave tokens to learn BPE from "
                f"(first error: {iterator.first_error or 'none'})"
            )
    return {"bpe_seconds": round(time.perf_counter() - started, 3), "bpe_files": len(sample)}


def ensure_tokenizer(cfg: Config, train_paths: list[Path], out_dir: Path) -> tuple[miditok.MusicTokenizer, dict]:
    """Load tokenizer.json if it was made from the current vocabulary params, else train and save it.

    Returns:
        The tokenizer and stats: `bpe_trained` (this run), `bpe_seconds`, `bpe_files`, `vocab_hash`.
    """
    tok_path, meta_path = out_dir / TOKENIZER_NAME, out_dir / VOCAB_META_NAME
    want = vocab_hash(cfg.tokenize)
    meta = read_json(meta_path, {}) or {}
    if tok_path.exists() and meta.get("vocab_hash") == want and meta.get("sha256") == sha256_file(tok_path):
        return load_tokenizer(tok_path), {**_meta_stats(meta), "bpe_trained": False}
    tokenizer = make_tokenizer(cfg.tokenize)
    stats = train_bpe(tokenizer, train_paths, cfg.tokenize, cfg.project.seed)
    with atomic_path(tok_path) as tmp:
        tokenizer.save(tmp)
    meta = {"vocab_hash": want, "sha256": sha256_file(tok_path), "trained_at": time.time(), **stats}
    write_json(meta_path, meta)
    # Reload so this run encodes exactly as every later reader of tokenizer.json will.
    return load_tokenizer(tok_path), {**_meta_stats(meta), "bpe_trained": True}


def _meta_stats(meta: dict) -> dict:
    return {k: meta[k] for k in ("vocab_hash", "bpe_seconds", "bpe_files")}


# ---------------------------------------------------------------- per piece


def load_piano_score(path: Path | str) -> Score:
    """Read a MIDI file and merge its non-drum tracks into one piano track (the model sees one stream).

    The symusic twin of `pipeline.core.midi.merge_piano` (miditok reads symusic scores; see there for why two).

    Raises:
        ValueError: the file cannot be parsed or has no notes.
    """
    try:
        score = Score(str(path))
    except Exception as err:
        raise ValueError(f"unreadable MIDI: {err}") from None
    merged = Score(score.ticks_per_quarter)
    merged.tempos = score.tempos.copy()
    track = Track(name="piano", program=0, is_drum=False)
    for src in score.tracks:
        if not src.is_drum:
            track.notes.extend(src.notes)
            track.pedals.extend(src.pedals)
    if len(track.notes) == 0:
        raise ValueError("no notes")
    track.notes.sort()
    merged.tracks.append(track)
    return merged


def encode_score(tokenizer: miditok.MusicTokenizer, score: Score) -> np.ndarray:
    """Token ids (BPE-encoded if trained) of a one-track score, without BOS/EOS. int32 (n_tokens,)."""
    ids = [i for seq in _as_list(tokenizer.encode(score)) for i in seq.ids]
    if not ids:
        raise ValueError(f"no tokens (no notes in pitch range {C.PIANO_MIN_PITCH}-{C.PIANO_MAX_PITCH}?)")
    return np.asarray(ids, dtype=np.int32)


def decode_ids(tokenizer: miditok.MusicTokenizer, ids: np.ndarray | list[int]) -> Score:
    """Inverse of `encode_score`: a one-track score at the tokenizer's time division."""
    seq = miditok.TokSequence(ids=[int(i) for i in ids], are_ids_encoded=tokenizer.is_trained)
    return tokenizer.decode([seq])


def encode_file(tokenizer: miditok.MusicTokenizer, path: Path) -> tuple[np.ndarray, dict]:
    """Encode one MIDI file and check its round trip.

    Returns:
        (ids without BOS/EOS, `roundtrip_counts` of encode -> decode plus `note_lengths`: the decoded notes'
        length histogram, `note_lengths.length_counts`, and `polyphony`: `note_lengths.polyphony_counts`).
    """
    score = load_piano_score(path)
    ids = encode_score(tokenizer, score)
    decoded = decode_ids(tokenizer, ids)
    counts = {"note_lengths": length_counts(decoded), "polyphony": polyphony_counts(decoded)}
    return ids, {**roundtrip_counts(tokenizer, score, decoded), **counts}


# ---------------------------------------------------------------- driver


def collect_items(inputs: dict[str, Path]) -> list[Item]:
    """Every input file named by split.json, per corpus and split. A style's train = its augmented copies (clean
    where a piece has none).

    Raises:
        FileNotFoundError: split.json is missing.
        ValueError: a style's train split is empty.
    """
    splits = load_split(inputs["split"], "tokenize")
    empty = [name for name, parts in style_splits(splits).items() if not parts.get("train")]
    if empty or not style_splits(splits):
        raise ValueError(f"tokenize: no train pieces for style(s) {empty or 'any'} in split.json; nothing to fine-tune")
    groups = [(C.BASE, None, splits.get(C.BASE, {}))] + [(C.STYLE, n, p) for n, p in style_splits(splits).items()]
    items = []
    for corpus, style, parts in groups:
        clean = sorted((inputs["clean"] / corpus).glob("*.mid"))
        for split in C.SPLITS:
            pieces = {piece_id(i) for i in parts.get(split, [])}
            chosen = [p for p in clean if piece_id(p.stem) in pieces]
            if corpus == C.STYLE and split == "train":
                chosen = _with_augmented(inputs["augment"], chosen, pieces)
            items += [Item(corpus, split, p.stem, p, style) for p in chosen]
    return items


def _with_augmented(augment_dir: Path, clean: list[Path], pieces: set[str]) -> list[Path]:
    augmented = [p for p in sorted((augment_dir / "midi").glob("*.mid")) if piece_id(p.stem) in pieces]
    covered = {piece_id(p.stem) for p in augmented}
    return augmented + [p for p in clean if piece_id(p.stem) not in covered]


_TOKENIZER: miditok.MusicTokenizer | None = None  # this process's tokenizer (set by `_init_encoder`)


def _init_encoder(threads: int | None, tokenizer_path: Path) -> None:
    """`run_jobs` initializer: load tokenizer.json once per process (the same file every later reader loads)."""
    global _TOKENIZER
    _TOKENIZER = load_tokenizer(tokenizer_path)


def encode_item(path: Path, out_dir: Path, rel: str) -> ItemResult:
    """Encode one MIDI file with this process's tokenizer into `out_dir/rel` (int32 ids, no BOS/EOS)."""
    ids, counts = encode_file(_TOKENIZER, path)
    _save_npy(out_dir / rel, ids)
    return ItemResult(outputs=[rel], stats={"n_tokens": len(ids), **counts})


def encode_items(items: list[Item], out_dir: Path, report: StageReport, workers: int | ProjectConfig) -> dict:
    """Encode new or changed items into the cache on `workers` (`run_jobs`; failures go to `report.failed`).

    Returns:
        item key -> index entry (`outputs`, and `stats` with `n_tokens`, `matched`, `notes`) for items that encoded.
    """
    index = ItemIndex(out_dir / CACHE_DIR / C.INDEX_NAME)
    tok_path = out_dir / TOKENIZER_NAME
    tok_sha = sha256_file(tok_path)
    jobs = []
    for item in items:
        key = sha256_text(sha256_file(item.path), tok_sha, STAGE_VERSION)
        rel = f"{CACHE_DIR}/{item.corpus}/{item.item_id}.npy"
        jobs.append(Job(item.key, key, encode_item, (item.path, out_dir, rel)))
    run_jobs(jobs, index, out_dir, report, workers, initializer=_init_encoder, initargs=(tok_path,))
    index.prune({i.key for i in items}, out_dir)
    return {k: e for k, e in index.entries.items() if "error" not in e}


def _save_npy(dest: Path, array: np.ndarray) -> None:
    with atomic_path(dest) as tmp, open(tmp, "wb") as f:
        np.save(f, array)


def run_tokenize(cfg: Config, inputs: dict[str, Path], out_dir: Path) -> StageReport:
    """Train (once) the shared BPE tokenizer, encode new pieces, and write every split's training windows.

    Raises:
        ValueError: a style's train split is empty, or none of its pieces could be encoded.
        AllItemsFailed: every input file failed to encode.
    """
    report = StageReport(stage="tokenize")
    items = collect_items(inputs)
    train_paths = [i.path for i in items if i.split == "train"]
    tokenizer, bpe_stats = ensure_tokenizer(cfg, train_paths, out_dir)
    ids = special_ids(tokenizer)
    done = encode_items(items, out_dir, report, cfg.project)
    counts = write_windows(items, done, out_dir, cfg.tokenize, ids)
    report.outputs = len(counts)
    report.stats = _stats(cfg.tokenize, tokenizer, ids, bpe_stats, done, counts)
    train = [done[i.key]["stats"] for i in items if i.split == "train" and i.key in done]
    q = cfg.tokenize.note_length_quantile
    report.stats["note_lengths"] = length_stats(merge_counts(t.get("note_lengths") for t in train), q)
    report.stats["polyphony"] = polyphony_stats(merge_counts(t.get("polyphony") for t in train), q)
    report.stats["tokenizer_sha256"] = sha256_file(out_dir / TOKENIZER_NAME)  # logged by training runs
    report.finish(out_dir, section_json(cfg.tokenize))
    raise_if_all_failed(report)
    train = {k: v for k, v in counts.items() if k.startswith(f"{C.STYLE}/") and k.endswith("/train")}
    unusable = [k for k, v in train.items() if not v["windows"]]
    if unusable:
        raise ValueError(f"tokenize: no train piece of {unusable} could be encoded; see tokenize report.json")
    return report


def _stats(
    tc: TokenizeConfig, tokenizer: miditok.MusicTokenizer, ids: dict, bpe: dict, done: dict, counts: dict
) -> dict:
    counts_of = ("notes", "matched", "onsets_matched")
    notes, matched, onsets = (sum(e["stats"][k] for e in done.values()) for k in counts_of)
    return {
        "kind": tc.kind,
        "vocab_size": tokenizer.vocab_size,
        **ids,
        "max_seq_len": tc.max_seq_len,
        "overlap": tc.overlap,
        **bpe,
        "roundtrip_notes": notes,
        "roundtrip_note_match": round(matched / notes, 4) if notes else None,
        "roundtrip_onset_match": round(onsets / notes, 4) if notes else None,
        "splits": counts,
    }
