"""Latency percentiles and real-time factor.

Latency of a chunk: session seconds from what triggered it (the end of the human's phrase: silence-gap deadline or
the trigger controller; in continuous mode the human event folded in, or the chunk boundary) to its first output
event (sent, in call-and-response; handed to the scheduler, in continuous mode, where output is planned ahead).
Real-time factor (RTF): seconds of music generated per second of generation compute; > 1 is faster than real time.

Continuous mode splits each measured latency into causes (`LatencyCauses`): `queue` (the event waited for the
generation thread: it was finishing a token, a plan or a slide), `fold_in` (taking the plan back and appending the
event's ids), `slide` (context-window re-prefills on the way), `plan` (sampling until the first planned event).
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass, field


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default method); NaN for no values."""
    if not values:
        return math.nan
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def _ms(seconds: float) -> float | None:
    return None if math.isnan(seconds) else round(seconds * 1000.0, 2)


@dataclass
class LatencyStats:
    """Collects per-chunk latency and compute; thread-safe."""

    latencies_s: list[float] = field(default_factory=list)
    music_s: float = 0.0  # seconds of music generated
    compute_s: float = 0.0  # seconds spent generating it
    tokens: int = 0
    slide_s: list[float] = field(default_factory=list)  # seconds per context-window slide (re-prefill)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add_latency(self, seconds: float) -> None:
        with self._lock:
            self.latencies_s.append(max(0.0, seconds))

    def add_chunk(self, music_s: float, compute_s: float, tokens: int) -> None:
        with self._lock:
            self.music_s += max(0.0, music_s)
            self.compute_s += compute_s
            self.tokens += tokens

    @property
    def rtf(self) -> float:
        return self.music_s / self.compute_s if self.compute_s > 0 else math.nan

    def summary(self) -> dict:
        """p50/p95/p99/max latency in ms, RTF, token throughput and slide cost, as plain JSON-able values."""
        with self._lock:
            lat, slides = list(self.latencies_s), list(self.slide_s)
        return {
            "chunks": len(lat),
            "p50_ms": _ms(percentile(lat, 50)),
            "p95_ms": _ms(percentile(lat, 95)),
            "p99_ms": _ms(percentile(lat, 99)),
            "max_ms": _ms(max(lat)) if lat else None,
            "rtf": None if math.isnan(self.rtf) else round(self.rtf, 2),
            "music_s": round(self.music_s, 3),
            "compute_s": round(self.compute_s, 3),
            "tokens": self.tokens,
            "ms_per_token": round(1000.0 * self.compute_s / self.tokens, 3) if self.tokens else None,
            "slides": len(slides),
            "slide_ms_mean": _ms(sum(slides) / len(slides)) if slides else None,
        }

    def report(self) -> str:
        """A short human-readable summary for the end of a session."""
        s = self.summary()
        if not s["chunks"]:
            return "latency: no responses measured"
        return (
            f"latency over {s['chunks']} chunks: p50 {s['p50_ms']} ms, p95 {s['p95_ms']} ms, p99 {s['p99_ms']} ms "
            f"(max {s['max_ms']} ms); RTF {s['rtf']} ({s['ms_per_token']} ms/token, {s['slides']} slides)"
        )


CAUSES = ("queue", "fold_in", "slide", "plan")


@dataclass
class LatencyCauses:
    """Seconds per cause of each measured continuous-mode latency (one writer: the generation thread)."""

    parts: dict[str, list[float]] = field(default_factory=lambda: {cause: [] for cause in CAUSES})

    def add(self, **seconds: float) -> None:
        for cause in CAUSES:
            self.parts[cause].append(max(0.0, seconds.get(cause, 0.0)))

    def summary(self) -> dict:
        """Per cause: p50/p99/max in ms and its share of the summed latency; and the causes of the slowest 1%."""
        total = sum(sum(v) for v in self.parts.values())
        lat = [sum(x) for x in zip(*self.parts.values(), strict=True)]
        if not lat:
            return {}
        tail = [i for i, v in enumerate(lat) if v >= percentile(lat, 99)]
        return {
            cause: {
                "p50_ms": _ms(percentile(v, 50)),
                "p99_ms": _ms(percentile(v, 99)),
                "max_ms": _ms(max(v)),
                "share": round(sum(v) / total, 3) if total else None,
                "mean_in_slowest_1pct_ms": _ms(sum(v[i] for i in tail) / len(tail)),
            }
            for cause, v in self.parts.items()
        }
