"""Bootstrap 95 % confidence intervals for evaluation's figures (percentile bootstrap, fixed seed)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from pipeline.evaluate import features as F

CI_LEVEL = 0.95


def bootstrap_ci(n: int, statistic: Callable[[np.ndarray], float], n_boot: int, seed: int) -> tuple[float, float]:
    """Percentile interval of `statistic(indices)` over `n_boot` resamples (with replacement) of range(n)."""
    rng = np.random.default_rng(seed)
    values = np.array([statistic(rng.integers(0, n, n)) for _ in range(n_boot)])
    tail = (1.0 - CI_LEVEL) / 2 * 100
    lo, hi = np.nanpercentile(values, [tail, 100 - tail])
    return float(lo), float(hi)


def nll_ratio_ci(model_sums, base_sums, counts, n_boot: int, seed: int) -> tuple[float, float]:
    """Paired bootstrap over test windows of (model NLL / base NLL); sums are per-window nats, counts tokens."""
    a, b, c = (np.asarray(x, dtype=float) for x in (model_sums, base_sums, counts))
    return bootstrap_ci(len(c), lambda i: (a[i].sum() / c[i].sum()) / (b[i].sum() / c[i].sum()), n_boot, seed)


def style_score_ci(
    pieces: Sequence[Sequence[F.Note]], real: dict, window_beats: float, method: F.OAMethod, n_boot: int, seed: int
) -> tuple[float, float]:
    """Bootstrap over generated samples of the style score against the real test pieces' pooled features."""
    values = [F.feature_values(p, window_beats) for p in pieces]
    real_dists = F.distributions(real, method)  # the same every resample

    def score(idx: np.ndarray) -> float:
        pooled = {k: np.concatenate([values[i][k] for i in idx]) for k in real}
        return F.style_score(F.compare_sets(pooled, real, method, real_dists))

    return bootstrap_ci(len(values), score, n_boot, seed) if values else (float("nan"), float("nan"))
