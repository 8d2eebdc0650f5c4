"""Note ends through the sustain pedal: a key released while the pedal is down sounds on until the pedal lifts."""

from __future__ import annotations

import bisect

import pretty_midi

PEDAL_DOWN = 64  # CC64 value at or above which the damper pedal is down (the MIDI convention)


def pedal_intervals(pedal: list[pretty_midi.ControlChange]) -> list[tuple[float, float]]:
    """(down, up) times in seconds of the sustain pedal, from CC64 changes (a pedal still down ends at +inf)."""
    spans, down = [], None
    for cc in sorted(pedal, key=lambda c: c.time):
        if cc.value >= PEDAL_DOWN and down is None:
            down = cc.time
        elif cc.value < PEDAL_DOWN and down is not None:
            spans.append((down, cc.time))
            down = None
    if down is not None:
        spans.append((down, float("inf")))
    return spans


def extend_through_pedal(
    notes: list[pretty_midi.Note], pedal: list[pretty_midi.ControlChange]
) -> list[pretty_midi.Note]:
    """Copies of `notes` whose ends are the sounding ends: a key release under the pedal is moved to the pedal's
    release, cut at the next onset of the same pitch (the key is struck again). Velocity and onsets kept."""
    spans = pedal_intervals(pedal)
    downs = [d for d, _ in spans]
    by_pitch: dict[int, list[float]] = {}
    for n in notes:
        by_pitch.setdefault(n.pitch, []).append(n.start)
    for starts in by_pitch.values():
        starts.sort()
    out = []
    for n in notes:
        end = n.end
        k = bisect.bisect_right(downs, end) - 1
        if k >= 0 and spans[k][0] <= end < spans[k][1]:
            starts = by_pitch[n.pitch]
            nxt = (
                starts[bisect.bisect_right(starts, n.start)]
                if bisect.bisect_right(starts, n.start) < len(starts)
                else float("inf")
            )
            end = max(n.end, min(spans[k][1], nxt))
            if end == float("inf"):
                end = n.end
        out.append(pretty_midi.Note(n.velocity, n.pitch, n.start, end))
    return out
