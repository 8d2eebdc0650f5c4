"""What every model is evaluated on: each style's held-out test set, the shared prompts, the style classifier.

Prompts are the openings of held-out pieces (test, then valid: never trained on), `evaluate.n_prompts` from every
style, so every adapter and the base continue the *same* prompts, drawn equally from all styles: a model that only
copies its prompt is attributed to each style equally often (chance).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipeline.core import constants as C
from pipeline.core.config import Config
from pipeline.core.files import read_json, sha256_file, sha256_text, windows_dir
from pipeline.data.split import SPLIT_FILE, style_splits
from pipeline.evaluate import features as F
from pipeline.evaluate.attribution import AttributionError, StyleClassifier
from realtime.bundle_format import TOKENIZER_FILE, load_tokenizer, special_ids


class EvaluateError(RuntimeError):
    """Nothing can be evaluated (no test data, bad bundle); the message says what to do."""


@dataclass
class StyleTest:
    """One style's held-out test split."""

    windows: np.ndarray  # (n_windows, max_seq_len) int32, PAD-padded
    pieces: dict[str, list[F.Note]]  # item id -> notes in beats (sorted ids)
    real_values: dict[str, np.ndarray]  # pooled feature values of all its test pieces
    real_out_of_key: float  # mean out-of-key share of its test pieces' windows (features.out_of_key)


@dataclass
class EvalData:
    """Everything but the model: per-style tests, prompt pieces, base corpus windows, the classifier."""

    styles: dict[str, StyleTest]
    pad_id: int
    tokenizer_path: Path
    prompt_paths: dict[str, Path]  # held-out piece id -> clean MIDI, `n_prompts` per style, styles interleaved
    prompt_style: dict[str, str]  # held-out piece id -> its style
    base_windows: np.ndarray | None = None  # base corpus test windows: forgetting is measured on them
    classifier: StyleClassifier | None = None
    classifier_note: str = ""  # why there is no classifier, or its held-out accuracy
    classifier_accuracy: float = float("nan")
    key: str = ""  # hash of the data (eval params are added by `eval_key`)
    pieces: dict[str, list[F.Note]] = field(default_factory=dict)  # prompt piece id -> notes (piano rolls)


def piece_paths(clean_dir: Path, ids: list[str]) -> dict[str, Path]:
    """Clean MIDI of each id: `<id>.mid`, or its segments `<id>__s*.mid` when the split lists pieces."""
    found: dict[str, Path] = {}
    for item in sorted(ids):
        path = clean_dir / f"{item}.mid"
        segments = [path] if path.exists() else sorted(clean_dir.glob(f"{item}{C.SEGMENT_SEP}*.mid"))
        found.update({p.stem: p for p in segments})
    return found


def even_subset(windows: np.ndarray, limit: int) -> np.ndarray:
    if not limit or len(windows) <= limit:
        return windows
    return windows[np.linspace(0, len(windows) - 1, limit).round().astype(int)]


def read_pieces(paths: dict[str, Path]) -> dict[str, list[F.Note]]:
    """Notes of each readable, non-empty piece (a broken file is left out, not fatal)."""
    pieces = {}
    for item, path in sorted(paths.items()):
        try:
            notes = F.load_notes(path)
        except Exception:  # symusic raises RuntimeError/ValueError on corrupt files
            continue
        if notes:
            pieces[item] = notes
    return pieces


def _style_test(cfg: Config, tok_dir: Path, clean_dir: Path, style: str, ids: list[str]) -> StyleTest:
    npy = windows_dir(tok_dir, style) / "test.npy"
    if not ids:
        raise EvaluateError(f"empty test split: split.json lists no test pieces of style {style!r} (`jam stage split`)")
    if not npy.exists():
        raise EvaluateError(f"{npy} missing: run `jam stage tokenize` first")
    windows = np.load(npy)
    if windows.ndim != 2 or len(windows) == 0:
        raise EvaluateError(f"empty test split: {npy} has no token windows")
    pieces = read_pieces(piece_paths(clean_dir, ids))
    if not pieces:
        raise EvaluateError(f"empty test split: no readable test piece of style {style!r} under {clean_dir}")
    beats = cfg.evaluate.window_beats
    real = F.pooled_values(pieces.values(), beats)
    return StyleTest(
        even_subset(windows, cfg.evaluate.max_windows), pieces, real, F.mean_out_of_key(pieces.values(), beats)
    )


def _prompt_pieces(clean_dir: Path, parts: dict[str, dict[str, list[str]]], n: int) -> dict[str, tuple[str, Path]]:
    """Up to `n` held-out pieces (test first, then valid) per style, interleaved: piece id -> (style, path)."""
    per_style = {}
    for style, split in parts.items():
        paths = {**piece_paths(clean_dir, split.get("test", [])), **piece_paths(clean_dir, split.get("valid", []))}
        per_style[style] = list(paths.items())[:n]
    out = {}
    for rnd in range(n):
        for style, items in per_style.items():
            if rnd < len(items):
                out[items[rnd][0]] = (style, items[rnd][1])
    return out


def _classifier(cfg: Config, clean_dir: Path, parts: dict, data: EvalData) -> None:
    """Fit the style classifier on every style's train pieces; its accuracy on the held-out ones (or why not)."""
    train = {s: list(read_pieces(piece_paths(clean_dir, p.get("train", []))).values()) for s, p in parts.items()}
    try:
        clf = StyleClassifier.fit(train, cfg.evaluate.window_beats, cfg.project.seed)
    except AttributionError as err:
        data.classifier_note = str(err)
        return
    held = {s: list(t.pieces.values()) for s, t in data.styles.items()}
    data.classifier, data.classifier_accuracy = clf, clf.accuracy(held)
    data.classifier_note = f"held-out test pieces attributed correctly: {data.classifier_accuracy:.2f}"


def load_eval_data(cfg: Config, inputs: dict[str, Path]) -> EvalData:
    """Test windows and pieces of every style, the shared prompts, base corpus windows, the classifier.

    Raises:
        EvaluateError: a missing or empty test split (with the stage to run).
    """
    tok_dir, clean_dir = inputs["tokenize"], inputs["clean"] / C.STYLE
    tok_path = tok_dir / TOKENIZER_FILE
    if not tok_path.exists():
        raise EvaluateError(f"{tok_path} missing: run `jam stage tokenize` first")
    split = read_json(inputs["split"] / SPLIT_FILE, {}) or {}
    found = style_splits(split)
    parts = {s: found[s] for s in cfg.styles if s in found}  # params order: the first style is the default
    missing = [s for s in cfg.styles if s not in parts]
    if missing:
        raise EvaluateError(f"split.json has no style {missing}: re-run `jam stage split` (styles changed)")
    styles = {s: _style_test(cfg, tok_dir, clean_dir, s, p.get("test", [])) for s, p in parts.items()}
    prompts = _prompt_pieces(clean_dir, parts, cfg.evaluate.n_prompts)
    pad_id = (read_json(tok_dir / C.REPORT_NAME, {}) or {}).get("stats", {}).get("pad_id")
    if pad_id is None:
        pad_id = special_ids(load_tokenizer(tok_path))["pad_id"]
    digests = [sha256_file(windows_dir(tok_dir, s) / "test.npy") for s in styles]
    data = EvalData(
        styles=styles,
        pad_id=int(pad_id),
        tokenizer_path=tok_path,
        prompt_paths={k: path for k, (_, path) in prompts.items()},
        prompt_style={k: style for k, (style, _) in prompts.items()},
        base_windows=_base_windows(windows_dir(tok_dir) / "test.npy", cfg.evaluate.max_windows),
        key=sha256_text(*digests, sha256_file(tok_path), json.dumps(parts, sort_keys=True)),
        pieces=read_pieces({k: path for k, (_, path) in prompts.items()}),
    )
    _classifier(cfg, clean_dir, parts, data)
    return data


def _base_windows(npy: Path, limit: int) -> np.ndarray | None:
    windows = np.load(npy) if npy.exists() else None
    return even_subset(windows, limit) if windows is not None and windows.ndim == 2 and len(windows) else None
