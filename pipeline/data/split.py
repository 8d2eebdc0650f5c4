"""Train/valid/test split of the clean corpora, by piece, before augmentation, and of each style on its own.

`split.json` is `{"base": {split: ids}, "styles": {style: {split: ids}}}`: a style's pieces are those whose acquired
item (`data/acquire/manifest.jsonl`) came from that style's sources, so every style has its own held-out pieces.

Each piece (`files.piece_id`: all segments of a performance together) gets a seeded hash in [0, 1); the hash alone
decides its split (test below `test_fraction`, valid below `test_fraction + valid_fraction`, else train). Adding a
piece therefore never moves another one, except through the small-corpus guarantee: with >= 3 pieces, every split
gets at least one piece.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from pipeline.core import constants as C
from pipeline.core.config import Config, SplitConfig, section_json
from pipeline.core.files import piece_id, read_json, write_json
from pipeline.core.items import StageReport
from pipeline.data.acquire.manifest import read_manifest

SPLIT_FILE = "split.json"
STYLES_KEY = "styles"
HASH_SCALE = float(1 << 64)  # first 8 bytes of a sha256 as a fraction of this: uniform in [0, 1)
MIN_PIECES_TO_HOLD_OUT = 3  # fewer pieces: all train (one piece cannot be both learned and held out)


def piece_rank(piece: str, seed: int) -> float:
    """Seeded, stable position of a piece in [0, 1)."""
    digest = hashlib.sha256(f"{seed}:{piece}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / HASH_SCALE


def _ensure_each_split(assign: dict[str, str], rank: dict[str, float], cfg: SplitConfig) -> None:
    """Give an empty split the piece from the fullest split whose rank is nearest that split's band."""
    centre = {
        "test": cfg.test_fraction / 2,
        "valid": cfg.test_fraction + cfg.valid_fraction / 2,
        "train": (1 + cfg.test_fraction + cfg.valid_fraction) / 2,
    }
    for name in ("test", "valid", "train"):
        sizes = {s: sum(1 for v in assign.values() if v == s) for s in C.SPLITS}
        if sizes[name]:
            continue
        donor = max(C.SPLITS, key=lambda s: (sizes[s], s == "train"))
        nearest = min((p for p, s in assign.items() if s == donor), key=lambda p: (abs(rank[p] - centre[name]), p))
        assign[nearest] = name


def assign_pieces(pieces: list[str], cfg: SplitConfig) -> dict[str, str]:
    """Piece -> "train" | "valid" | "test".

    Args:
        pieces: piece ids (any order, duplicates ignored).
        cfg: the split section (fractions and seed).

    Returns:
        The split of every piece; all train when there are fewer than MIN_PIECES_TO_HOLD_OUT pieces.
    """
    unique = sorted(set(pieces))
    if len(unique) < MIN_PIECES_TO_HOLD_OUT:
        return dict.fromkeys(unique, "train")
    rank = {p: piece_rank(p, cfg.seed) for p in unique}
    valid_end = cfg.test_fraction + cfg.valid_fraction
    assign = {p: "test" if r < cfg.test_fraction else "valid" if r < valid_end else "train" for p, r in rank.items()}
    _ensure_each_split(assign, rank, cfg)
    return assign


def split_items(item_ids: list[str], cfg: SplitConfig) -> dict[str, list[str]]:
    """Item ids (segments included) grouped into {"train": [...], "valid": [...], "test": [...]}, sorted."""
    assign = assign_pieces([piece_id(i) for i in item_ids], cfg)
    out: dict[str, list[str]] = {s: [] for s in C.SPLITS}
    for item in sorted(set(item_ids)):
        out[assign[piece_id(item)]].append(item)
    return out


def clean_ids(clean_dir: Path, corpus: str) -> list[str]:
    """Ids of the clean items of one corpus (file stems under `clean_dir/<corpus>/`)."""
    folder = clean_dir / corpus
    if not folder.is_dir():
        return []
    return sorted(p.stem for p in folder.glob("*.mid") if not p.name.startswith("."))  # ".x.tmp.mid": unfinished


def style_splits(split: dict) -> dict[str, dict[str, list[str]]]:
    """style -> {split -> item ids} from a loaded split.json."""
    return split.get(STYLES_KEY) or {}


def style_items(split: dict, which: str) -> list[str]:
    """Item ids of one split (train, valid, test) over every style, sorted."""
    return sorted(i for parts in style_splits(split).values() for i in parts.get(which, []))


def load_split(split_dir: Path, stage: str) -> dict:
    """split.json, or FileNotFoundError naming `stage` as the one that needs it."""
    split = read_json(split_dir / SPLIT_FILE)
    if split is None:
        raise FileNotFoundError(f"{stage}: {split_dir / SPLIT_FILE} not found; run the split stage first")
    return split


def _by_style(ids: list[str], manifest: dict[str, dict], styles: list[str], report: StageReport) -> dict:
    """Clean style ids grouped by their acquired item's style; ids without one are reported as dropped."""
    grouped: dict[str, list[str]] = {name: [] for name in styles}
    for item in ids:
        style = (manifest.get(piece_id(item)) or {}).get("style")
        if style in grouped:
            grouped[style].append(item)
        else:
            report.dropped[item] = f"no configured style (manifest style {style!r}); re-run acquire"
    return grouped


def _split_corpus(ids: list[str], cfg: SplitConfig) -> tuple[dict[str, list[str]], dict]:
    split = split_items(ids, cfg)
    stats: dict = {s: {"items": len(v), "pieces": len({piece_id(i) for i in v})} for s, v in split.items()}
    if 0 < len({piece_id(i) for i in ids}) < MIN_PIECES_TO_HOLD_OUT:
        stats["warning"] = f"fewer than {MIN_PIECES_TO_HOLD_OUT} pieces: nothing held out"
    return split, stats


def run_split(cfg: Config, inputs: dict[str, Path], out_dir: Path) -> StageReport:
    """Write `data/split/split.json`; rewritten only when the assignment changes."""
    report = StageReport(stage="split")
    style_ids, base_ids = clean_ids(inputs["clean"], C.STYLE), clean_ids(inputs["clean"], C.BASE)
    report.items_in = len(style_ids) + len(base_ids)
    base, report.stats[C.BASE] = _split_corpus(base_ids, cfg.split)
    grouped = _by_style(style_ids, read_manifest(inputs["acquire"]), list(cfg.styles), report)
    styles = {}
    for name, ids in grouped.items():
        styles[name], report.stats[name] = _split_corpus(ids, cfg.split)
    split = {C.BASE: base, STYLES_KEY: styles}
    dest = out_dir / SPLIT_FILE
    if read_json(dest) == split:
        report.cached.append(SPLIT_FILE)
    else:
        write_json(dest, split)
        report.processed.append(SPLIT_FILE)
    report.outputs = 1
    report.finish(out_dir, section_json(cfg.split))
    if report.items_in == 0:
        raise FileNotFoundError(f"split: no clean items under {inputs['clean']}; run the clean stage first")
    return report
