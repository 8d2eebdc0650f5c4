"""Training windows: each piece's cached ids framed by BOS/EOS and cut into overlapping fixed-length windows.

The tokenize stage's last step (`write_windows`), kept apart from the tokenizer and the per-piece encoding: it
reads only the cache's `.npy` files and writes `base/<split>.npy` and `style/<name>/<split>.npy`, int32
(n_windows, max_seq_len), which training reads memory-mapped (`pipeline.train.dataset.TokenWindows`).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from pipeline.core import constants as C
from pipeline.core.config import TokenizeConfig
from pipeline.core.files import atomic_path, windows_dir

if TYPE_CHECKING:  # only for the annotation: tokenize imports this module
    from pipeline.data.tokenize import Item


def n_windows(n_ids: int, max_seq_len: int, overlap: int) -> int:
    """Windows `window_ids` cuts from `n_ids` ids: 1 + ceil((n - L) / (L - overlap)) for n > L, else 1."""
    return 1 + max(0, -(-(n_ids - max_seq_len) // (max_seq_len - overlap)))


def window_ids(ids: np.ndarray, max_seq_len: int, overlap: int, pad_id: int) -> np.ndarray:
    """Cut one sequence into windows of `max_seq_len` sharing `overlap` tokens; the last is PAD-padded.

    Returns:
        int32 (n_windows, max_seq_len), `n_windows(len(ids), ...)` rows.
    """
    stride = max_seq_len - overlap
    count = n_windows(len(ids), max_seq_len, overlap)
    padded = np.full((count - 1) * stride + max_seq_len, pad_id, dtype=np.int32)
    padded[: len(ids)] = ids
    return np.lib.stride_tricks.sliding_window_view(padded, max_seq_len)[::stride].copy()


def write_windows(items: list[Item], done: dict, out_dir: Path, tc: TokenizeConfig, ids: dict[str, int]) -> dict:
    """Write every corpus's `<split>.npy` (base, and each style's; empty ones too). Returns per-split counts."""
    counts = {}
    for style in dict.fromkeys([None, *(i.style for i in items if i.style)]):
        folder = windows_dir(out_dir, style)
        for split in C.SPLITS:
            chosen = [i for i in items if i.style == style and i.split == split and i.key in done]
            seqs = [out_dir / done[i.key]["outputs"][0] for i in chosen]
            rel = folder.relative_to(out_dir).as_posix()
            counts[f"{rel}/{split}"] = _write_split(folder / f"{split}.npy", seqs, tc, ids)
    return counts


def _write_split(dest: Path, seqs: list[Path], tc: TokenizeConfig, ids: dict[str, int]) -> dict:
    """Stream the pieces' windows into one int32 (n_windows, max_seq_len) `.npy`, memory-mapped while written.

    Memory is one piece's windows, not the corpus's (a base corpus of thousands of hours is GBs of windows); the
    file is the same bytes `np.save` would write, and training reads it memory-mapped (`TokenWindows`).
    """
    lengths = [len(np.load(p, mmap_mode="r")) + 2 for p in seqs]  # + BOS, EOS; reads only the headers
    rows = [n_windows(n, tc.max_seq_len, tc.overlap) for n in lengths]
    with atomic_path(dest) as tmp:
        if not sum(rows):  # numpy cannot map zero bytes
            np.save(tmp, np.zeros((0, tc.max_seq_len), dtype=np.int32))
        else:
            out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.int32, shape=(sum(rows), tc.max_seq_len))
            start = 0
            for path, count in zip(seqs, rows, strict=True):
                out[start : start + count] = window_ids(_framed(np.load(path), ids), tc.max_seq_len, tc.overlap,
                                                        ids["pad_id"])  # fmt: skip
                start += count
            out.flush()
            del out  # unmapped before the rename
    return {"pieces": len(seqs), "tokens": sum(lengths), "windows": sum(rows)}


def _framed(seq: np.ndarray, ids: dict[str, int]) -> np.ndarray:
    return np.concatenate([[ids["bos_id"]], seq, [ids["eos_id"]]]).astype(np.int32)
