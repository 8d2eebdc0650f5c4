"""Evaluation figures as PNG files: piano rolls, per-feature OA bars, feature histograms.

Uses `matplotlib.figure.Figure` directly (no pyplot), so no GUI backend is selected and nothing global changes.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from pipeline.core.files import atomic_path
from pipeline.evaluate.features import FEATURES, Note

FEATURE_UNITS = {
    "pitch_class": "pitch class (C=0)",
    "pitch_range": "semitones per window",
    "interval": "semitones",
    "ioi": "beats",
    "duration": "beats",
    "velocity": "velocity",
    "polyphony": "notes sounding",
    "density": "onsets per beat",
}


def _save(fig, path: Path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight")
    return path


def _roll(ax, notes: Sequence[Note], title: str, color: str) -> None:
    """One bar per note, more opaque the louder; all in one collection (an artist per note took ~1 s a roll)."""
    from matplotlib.collections import PolyCollection
    from matplotlib.colors import to_rgba

    if notes:
        box = np.asarray([[n.start, n.end, n.pitch - 0.4, n.pitch + 0.4] for n in notes])
        x0, x1, y0, y1 = box.T
        verts = np.stack([np.c_[x0, y0], np.c_[x0, y1], np.c_[x1, y1], np.c_[x1, y0]], axis=1)
        colors = np.tile(to_rgba(color), (len(notes), 1))
        colors[:, 3] = 0.3 + 0.7 * np.asarray([n.velocity for n in notes]) / 127
        ax.add_collection(PolyCollection(verts, facecolors=colors, edgecolors=colors))  # as broken_barh(color=)
        ax.autoscale_view()
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("beats")
    if not notes:
        ax.text(0.5, 0.5, "no notes", transform=ax.transAxes, ha="center", va="center")


def piano_roll_png(
    sample: Sequence[Note], real: Sequence[Note], path: Path, titles: tuple[str, str] = ("generated", "real")
) -> Path:
    """Two piano rolls side by side on one pitch axis: a generated sample and a real piece.

    Args:
        sample: generated notes (beats).
        real: notes of a real piece; only as many beats as the sample lasts are shown (at least 8).
        path: PNG to write.
        titles: panel titles (sample, real).

    Returns:
        `path`.
    """
    from matplotlib.figure import Figure

    span = max([n.end for n in sample] + [8.0])
    start = min((n.start for n in real), default=0.0)
    real = [n for n in real if n.start < start + span]
    pitches = [n.pitch for n in [*sample, *real]] or [60]
    fig = Figure(figsize=(11, 4))
    axes = fig.subplots(1, 2, sharey=True)
    _roll(axes[0], sample, titles[0], "tab:orange")
    _roll(axes[1], real, titles[1], "tab:blue")
    axes[0].set_ylim(min(pitches) - 2, max(pitches) + 2)
    axes[0].set_ylabel("MIDI pitch")
    return _save(fig, path)


def session_roll_png(tracks: dict[str, Sequence[Note]], path: Path, title: str = "jam session") -> Path:
    """One piano roll with every track of a session overlaid in its own colour (human vs model)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 4))
    ax = fig.subplots()
    colors = ["tab:blue", "tab:orange", "tab:green", "tab:red"]
    for (name, notes), color in zip(tracks.items(), colors, strict=False):
        _roll(ax, notes, title, color)
        ax.plot([], [], color=color, linewidth=6, label=f"{name} ({len(notes)} notes)")
    ax.set_ylabel("MIDI pitch")
    ax.legend(loc="upper right", fontsize=8)
    return _save(fig, path)


def feature_comparison_png(oa: dict[str, float], base_oa: dict[str, float] | None, path: Path) -> Path:
    """Grouped bars of the overlapping area per feature: fine-tuned vs base model (vs real held-out music).

    Args:
        oa: feature -> OA of the fine-tuned model's samples.
        base_oa: feature -> OA of the base model's samples, or None.
        path: PNG to write.

    Returns:
        `path`.
    """
    from matplotlib.figure import Figure

    names = list(oa)
    x = np.arange(len(names))
    width = 0.38 if base_oa else 0.6
    fig = Figure(figsize=(9, 3.8))
    ax = fig.subplots()
    ax.bar(x - (width / 2 if base_oa else 0), [oa[n] for n in names], width, label="model", color="tab:orange")
    if base_oa:
        ax.bar(x + width / 2, [base_oa.get(n, 0.0) for n in names], width, label="base", color="tab:gray")
    ax.set_xticks(x, names, rotation=30, ha="right")
    ax.set_ylim(0, 1)
    ax.set_ylabel("overlapping area with real held-out music")
    ax.legend(loc="upper right", fontsize=8)
    return _save(fig, path)


def feature_histograms_png(sets: dict[str, dict[str, np.ndarray]], path: Path) -> Path:
    """One panel per feature with a normalised histogram for each named set (e.g. real, model, base).

    Args:
        sets: set label -> feature -> pooled values (see `features.pooled_values`).
        path: PNG to write.

    Returns:
        `path`.
    """
    from matplotlib.figure import Figure

    fig = Figure(figsize=(13, 6))
    axes = fig.subplots(2, 4).ravel()
    for ax, (name, spec) in zip(axes, FEATURES.items(), strict=False):
        bins = np.arange(spec.lo, spec.hi + spec.bin_width / 2, spec.bin_width)
        for label, values in sets.items():
            v = np.clip(values.get(name, np.zeros(0)), spec.lo, spec.hi)
            if v.size:
                ax.hist(v, bins=bins, density=True, histtype="step", label=label)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel(FEATURE_UNITS.get(name, ""), fontsize=8)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, path)
