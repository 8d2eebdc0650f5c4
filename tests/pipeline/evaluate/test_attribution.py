"""Style attribution: the classifier of real pieces, the attribution share with its CI, blend plans."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.evaluate import features as F
from pipeline.evaluate.attribution import (
    AttributionError,
    StyleClassifier,
    attribution,
    passage_attribution,
    passages,
    window_vectors,
)
from pipeline.evaluate.blend import blend_plan, blend_problem


def _melody(seed: int, beats: int = 32) -> list[F.Note]:
    """A running line of eighth notes, high, one voice (a fiddle tune)."""
    rng = np.random.default_rng(seed)
    pitches = 72 + np.cumsum(rng.integers(-2, 3, beats * 2)) % 12
    return [F.Note(int(p), i * 0.5, i * 0.5 + 0.45, 80) for i, p in enumerate(pitches)]


def _chorale(seed: int, beats: int = 32) -> list[F.Note]:
    """Four-voice chords on every beat, low and soft (a hymn)."""
    rng = np.random.default_rng(seed)
    out = []
    for b in range(beats):
        root = 43 + int(rng.integers(0, 7))
        out += [F.Note(root + step, float(b), b + 0.95, 60) for step in (0, 7, 12, 16)]
    return out


def _set(make, seeds) -> list[list[F.Note]]:
    return [make(s) for s in seeds]


@pytest.fixture(scope="module")
def clf() -> StyleClassifier:
    return StyleClassifier.fit({"fiddle": _set(_melody, range(6)), "hymn": _set(_chorale, range(6))}, 8.0, 0)


def test_window_vectors_are_per_window_and_skip_near_empty_windows():
    assert window_vectors(_melody(0, beats=32), 8.0).shape == (4, 10)  # 32 beats = 4 windows
    assert window_vectors(_melody(0)[:3], 8.0).shape == (0, 10)  # 3 notes: too little to judge


def test_held_out_pieces_are_attributed_to_their_style(clf):
    held = {"fiddle": _set(_melody, range(10, 14)), "hymn": _set(_chorale, range(10, 14))}
    assert clf.accuracy(held) == 1.0
    assert clf.predict(F.transpose(_melody(20), -12)) == "fiddle"  # an octave down is still a fiddle tune
    assert clf.predict(_melody(0)[:3]) is None  # too short to judge


def test_attribution_share_and_ci(clf):
    samples = _set(_melody, range(30, 36)) + _set(_chorale, range(30, 32))  # 6 of 8 sound like the fiddle
    att = attribution(clf, samples, "fiddle", n_boot=200, seed=0)
    assert att["share"] == pytest.approx(0.75) and att["ci_low"] < 0.75 < att["ci_high"] <= 1.0
    assert attribution(clf, [[]] * 4, "fiddle", 50, 0)["share"] == 0.0  # unjudgeable samples count as misses


def test_real_passages_of_a_samples_length_give_the_reference_share(clf):
    piece = _melody(40, beats=32)
    cut = passages(piece, 12.0)  # 32 beats: 0-12, 12-24, 24-32 (8 beats, over half a passage: kept)
    assert [len(c) for c in cut] == [24, 24, 16] and sum(map(len, cut)) == len(piece)
    assert len(passages(piece, 20.0)) == 2 and passages([], 8.0) == []
    ref = passage_attribution(clf, _set(_melody, range(40, 43)), "fiddle", 12.0)
    assert ref == {"share": 1.0, "passages": 9.0}
    assert passage_attribution(clf, _set(_chorale, range(40, 43)), "fiddle", 12.0)["share"] == 0.0
    assert np.isnan(passage_attribution(clf, [], "fiddle", 12.0)["share"])


def test_a_classifier_needs_two_styles_with_windows():
    with pytest.raises(AttributionError, match="two styles or more"):
        StyleClassifier.fit({"fiddle": _set(_melody, range(3))}, 8.0, 0)
    with pytest.raises(AttributionError, match=r"no train piece of \['hymn'\]"):
        StyleClassifier.fit({"fiddle": _set(_melody, range(3)), "hymn": [_chorale(0)[:2]]}, 8.0, 0)


def test_blend_plan_ends_play_one_adapter():
    assert blend_plan("a", "b", 1.0) == {"a": 1.0} and blend_plan("a", "b", 0.0) == {"b": 1.0}
    assert blend_plan("a", "b", 0.25) == {"a": 0.25, "b": 0.75}


def test_a_blend_must_move_attribution_with_its_weight():
    def rows(*shares: float) -> list[dict[str, float]]:
        return [{"weight": i / (len(shares) - 1), "share": s} for i, s in enumerate(shares)]

    assert blend_problem(rows(0.0, 0.12, 0.67, 0.79, 0.92)) is None  # the demo model, measured
    assert "falls as the weight rises (0.67 -> 0.60)" in blend_problem(rows(0.0, 0.67, 0.6, 0.9))
    assert "moves 0.30 from one end" in blend_problem(rows(0.4, 0.5, 0.7))  # the prompt, not the weight, decides
    noisy = rows(0.0, 0.2, 0.15, 0.6, 0.9)
    noisy[2]["ci_high"] = 0.3  # the dip lies within the later share's 95 % interval: sampling noise
    assert blend_problem(noisy) is None
    noisy[2]["ci_high"] = 0.18
    assert "falls as the weight rises (0.20 -> 0.15)" in blend_problem(noisy)
