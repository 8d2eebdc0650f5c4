"""The tokenize stage's windows for training: validated, memory-mapped, batched by a seeded permutation.

Files: `data/tokenize/<corpus>/<split>.npy`, int32 (n_windows, max_seq_len).

The array is memory-mapped, so a large corpus costs no RAM until rows are read; a row becomes a causal-LM example
with PAD masked out of attention and loss. Labels are not shifted: transformers' causal LMs shift them internally.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import ConcatDataset, Dataset, Subset

from pipeline.core import constants as C
from pipeline.core.files import read_json

IGNORE_INDEX = -100  # label value torch's cross-entropy (and transformers) skips
INFO_KEYS = ("kind", "vocab_size", "pad_id", "bos_id", "eos_id", "max_seq_len", "overlap", "tokenizer_sha256")


class TrainInputError(ValueError):
    """Data or params that cannot train (found before the first step); the message says what to fix."""


def check_windows(path: Path, vocab_size: int, max_positions: int, required: bool = True) -> int:
    """Validate a window file before training; returns its number of windows (0 when optional and absent).

    Raises:
        TrainInputError: missing (when required), not 2-D integer, empty, too long, or ids outside the vocabulary.
    """
    if not path.is_file():
        if required:
            raise TrainInputError(f"missing dataset {path}: run `jam stage tokenize` first")
        return 0
    try:
        arr = np.load(path, mmap_mode="r")
    except (OSError, ValueError) as err:
        raise TrainInputError(f"unreadable dataset {path}: {err}") from None
    if arr.ndim != 2 or not np.issubdtype(arr.dtype, np.integer):
        raise TrainInputError(f"{path}: expected (n_windows, seq_len) integers, got {arr.dtype} {arr.shape}")
    if arr.shape[0] == 0 or arr.shape[1] < 2:
        if required:
            raise TrainInputError(f"empty dataset {path} (shape {arr.shape}): nothing to train on")
        return 0
    if arr.shape[1] > max_positions:
        raise TrainInputError(f"{path}: windows of {arr.shape[1]} tokens exceed the model's {max_positions}")
    lo, hi = int(arr.min()), int(arr.max())
    if lo < 0 or hi >= vocab_size:
        raise TrainInputError(f"{path}: token ids span {lo}..{hi}, outside the vocabulary (size {vocab_size})")
    return int(arr.shape[0])


def collate(items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack windows and drop the columns that are padding in every row (windows are right-padded)."""
    batch = {k: torch.stack([it[k] for it in items]) for k in items[0]}  # each (batch, seq)
    used = batch["attention_mask"].any(dim=0).nonzero()
    length = max(2, int(used.max()) + 1) if len(used) else 2
    return {k: v[:, :length] for k, v in batch.items()}


def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`batch` as the model takes it: without `attention_mask` when every row's padding comes after its tokens.

    A causal model's outputs at a row's tokens then attend to the same tokens as with the mask (padding only follows
    them) and padding carries no loss, so loss and gradients are the same; attention runs as causal instead of over
    a materialised mask (SDPA's forward + backward at the demo's shapes, float32: 27.2 -> 25.5 ms a layer,
    2 threads; bfloat16 35.4 -> 34.0).
    """
    mask = batch["attention_mask"]  # (batch, seq)
    if bool((mask[:, 1:] <= mask[:, :-1]).all()):
        return {k: v for k, v in batch.items() if k != "attention_mask"}
    return batch


class Batches:
    """Micro-batches over a seeded per-epoch permutation; batch `index` of `epoch` is always the same windows.

    A global micro-batch is `batch_size * world` windows; process `rank` takes its slice. Last partial one dropped.
    """

    def __init__(self, ds: torch.utils.data.Dataset, batch_size: int, seed: int, rank: int = 0, world: int = 1):
        self.ds, self.batch_size, self.seed, self.rank, self.world = ds, batch_size, seed, rank, world
        self.per_epoch = len(ds) // (batch_size * world)
        if self.per_epoch == 0:
            raise TrainInputError(
                f"batch_size {batch_size} x {world} process(es) is larger than the {len(ds)} training windows"
            )
        self._perm: tuple[int, np.ndarray] | None = None

    def indices(self, epoch: int, index: int) -> np.ndarray:
        if self._perm is None or self._perm[0] != epoch:
            self._perm = (epoch, np.random.default_rng([self.seed, epoch]).permutation(len(self.ds)))
        size = self.batch_size * self.world
        chunk = self._perm[1][index * size : (index + 1) * size]
        return chunk[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]

    def get(self, epoch: int, index: int) -> dict[str, torch.Tensor]:
        return collate([self.ds[int(i)] for i in self.indices(epoch, index)])


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


def with_replay(style: Dataset, base: Dataset, fraction: float, seed: int) -> Dataset:
    """`style` plus a seeded sample of `base` windows making up `fraction` of the result (rehearsal).

    Replaying a share of the pretraining data while fine-tuning is the standard guard against catastrophic
    forgetting; the sample is drawn once from `seed`, so a resumed run sees the same windows. Drawn with replacement
    only when the base has fewer windows than asked.
    """
    if fraction <= 0 or not len(base):
        return style
    n = round(len(style) * fraction / (1.0 - fraction))
    picks = np.random.default_rng(seed).choice(len(base), size=n, replace=n > len(base))
    return ConcatDataset([style, Subset(base, np.sort(picks).tolist())])


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
