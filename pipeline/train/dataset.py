"""Torch view of the tokenize stage's windows: `data/tokenize/<corpus>/<split>.npy`, int32 (n_windows, max_seq_len).

The array is memory-mapped, so a large corpus costs no RAM until rows are read; a row becomes a causal-LM example
with PAD masked out of attention and loss. Labels are not shifted: transformers' causal LMs shift them internally.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from pipeline.core import constants as C
from pipeline.core.files import read_json

IGNORE_INDEX = -100  # label value torch's cross-entropy (and transformers) skips
INFO_KEYS = ("kind", "vocab_size", "pad_id", "bos_id", "eos_id", "max_seq_len", "overlap", "tokenizer_sha256")


class TokenWindows(Dataset):
    """Fixed-length token windows as `{"input_ids", "attention_mask", "labels"}` LongTensors of shape (L,).

    Args:
        npy_path: a `<corpus>/<split>.npy` written by the tokenize stage.
        pad_id: the PAD id (`dataset_info(...)["pad_id"]`); PAD positions get mask 0 and label -100.
    """

    def __init__(self, npy_path: Path | str, pad_id: int):
        self.path = Path(npy_path)
        self.windows = np.load(self.path, mmap_mode="r")  # (n_windows, max_seq_len) int32
        if self.windows.ndim != 2:
            raise ValueError(f"{self.path}: expected (n_windows, max_seq_len), got shape {self.windows.shape}")
        self.pad_id = int(pad_id)

    def __len__(self) -> int:
        return self.windows.shape[0]

    @property
    def seq_len(self) -> int:
        return self.windows.shape[1]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        ids = torch.from_numpy(np.asarray(self.windows[index], dtype=np.int64))  # copies the row out of the mmap
        pad = ids == self.pad_id
        return {
            "input_ids": ids,
            "attention_mask": (~pad).long(),
            "labels": ids.masked_fill(pad, IGNORE_INDEX),
        }


def dataset_info(tokenize_dir: Path | str) -> dict[str, Any]:
    """What a trainer needs from the tokenize stage: vocab size, PAD/BOS/EOS ids, window length, tokenizer path.

    Raises:
        FileNotFoundError: the tokenize stage has not written its report yet.
    """
    tokenize_dir = Path(tokenize_dir)
    report = read_json(tokenize_dir / C.REPORT_NAME)
    if report is None:
        raise FileNotFoundError(f"{tokenize_dir / C.REPORT_NAME} not found; run the tokenize stage first")
    stats = report.get("stats", {})
    missing = [k for k in INFO_KEYS if k not in stats]
    if missing:
        raise ValueError(f"{tokenize_dir / C.REPORT_NAME}: stats lack {missing}; re-run the tokenize stage")
    info = {k: stats[k] for k in INFO_KEYS}
    info["tokenizer_path"] = str(tokenize_dir / "tokenizer.json")
    info["splits"] = stats.get("splits", {})
    return info
