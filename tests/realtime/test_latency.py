"""Latency statistics."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest

from realtime.latency import LatencyCauses, LatencyStats, percentile
from realtime.recorder import ClockTempo


def test_percentile_matches_numpy():
    rng = random.Random(0)
    values = [rng.expovariate(50.0) for _ in range(101)]
    for q in (0, 50, 95, 99, 100):
        assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)))
    assert math.isnan(percentile([], 50))


def test_summary_in_ms_and_rtf():
    stats = LatencyStats()
    for ms in range(1, 101):
        stats.add_latency(ms / 1000.0)
    stats.add_chunk(music_s=4.0, compute_s=0.2, tokens=100)
    stats.add_chunk(music_s=2.0, compute_s=0.1, tokens=50)
    s = stats.summary()
    assert s["chunks"] == 100
    assert s["p50_ms"] == pytest.approx(50.5)
    assert s["p99_ms"] == pytest.approx(99.01)
    assert s["rtf"] == pytest.approx(20.0)
    assert s["ms_per_token"] == pytest.approx(2.0)
    assert "p99 99.01 ms" in stats.report()
    assert LatencyStats().summary()["p50_ms"] is None


def test_latency_causes_split_and_tail():
    causes = LatencyCauses()
    for _ in range(99):
        causes.add(queue=0.001, fold_in=0.002, plan=0.001)
    causes.add(queue=0.001, fold_in=0.002, slide=0.010, plan=0.001)  # the slowest: a slide on the way
    s = causes.summary()
    assert s["fold_in"]["p50_ms"] == pytest.approx(2.0) and s["slide"]["p50_ms"] == 0.0
    assert s["slide"]["max_ms"] == pytest.approx(10.0)
    assert s["slide"]["mean_in_slowest_1pct_ms"] == pytest.approx(10.0)  # the tail's cause is named
    assert sum(c["share"] for c in s.values()) == pytest.approx(1.0, abs=1e-3)
    assert LatencyCauses().summary() == {}


def test_midi_clock_tempo():
    tempo, t, bpm = ClockTempo(), 0.0, None
    for _ in range(30):
        bpm = tempo.feed(t) or bpm
        t += 60.0 / (100.0 * 24)  # 100 BPM
    assert bpm == pytest.approx(100.0)
    assert tempo.feed(t + 5.0) is None  # the clock stopped: start over
