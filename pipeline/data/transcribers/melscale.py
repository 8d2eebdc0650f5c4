"""A minimal stand-in for `torchaudio.functional.melscale_fbanks`, the one torchaudio function Transkun calls.

No torchaudio release matches the pinned torch (2.13; torchaudio's newest is 2.11.x and its compiled library fails
to load beside it), and Transkun only needs this pure-Python filter bank when its model is built (the weights then
overwrite the buffer: `framewiseFeatureExtractor.freq2mels` is in the checkpoint). `torchaudio_stub` registers it as
`torchaudio.functional` only while the model is built and only when torchaudio is not installed.
"""

from __future__ import annotations

import importlib.util
import math
import sys
import types
from collections.abc import Iterator
from contextlib import contextmanager

import torch


def _hz_to_mel(freq: float) -> float:
    return 2595.0 * math.log10(1.0 + freq / 700.0)  # HTK scale, torchaudio's default


def melscale_fbanks(
    n_freqs: int,
    f_min: float,
    f_max: float,
    n_mels: int,
    sample_rate: int,
    norm: str | None = None,
    mel_scale: str = "htk",
) -> torch.Tensor:
    """Triangular mel filters, (n_freqs, n_mels): torchaudio's defaults (HTK scale, no area normalisation)."""
    if norm is not None or mel_scale != "htk":
        raise NotImplementedError("only torchaudio's defaults (norm=None, mel_scale='htk') are provided")
    all_freqs = torch.linspace(0, sample_rate // 2, n_freqs)
    m_pts = torch.linspace(_hz_to_mel(f_min), _hz_to_mel(f_max), n_mels + 2)
    f_pts = 700.0 * (10 ** (m_pts / 2595.0) - 1.0)
    f_diff = f_pts[1:] - f_pts[:-1]  # (n_mels + 1,)
    slopes = f_pts.unsqueeze(0) - all_freqs.unsqueeze(1)  # (n_freqs, n_mels + 2)
    down = -slopes[:, :-2] / f_diff[:-1]
    up = slopes[:, 2:] / f_diff[1:]
    return torch.max(torch.zeros(1), torch.min(down, up))


@contextmanager
def torchaudio_stub() -> Iterator[None]:
    """`import torchaudio` finds this module's `melscale_fbanks` inside the block, if torchaudio is absent."""
    if importlib.util.find_spec("torchaudio") is not None or "torchaudio" in sys.modules:
        yield
        return
    package, functional = types.ModuleType("torchaudio"), types.ModuleType("torchaudio.functional")
    functional.melscale_fbanks = melscale_fbanks
    package.functional = functional
    sys.modules.update({"torchaudio": package, "torchaudio.functional": functional})
    try:
        yield
    finally:
        sys.modules.pop("torchaudio", None)
        sys.modules.pop("torchaudio.functional", None)
