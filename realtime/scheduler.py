"""Output scheduling on a monotonic clock, with note-off bookkeeping.

Events carry absolute session times (seconds on `time.monotonic`), never "sleep N ms then send": each wake-up sends
everything due by `now`, so late wake-ups and send costs never accumulate into drift. The scheduler owns the output
note state: a note-on for a sounding pitch first ends it, a note-off for a silent pitch is dropped, a note held
longer than `max_note_s` is ended by a guard, and `all_notes_off()` (explicit note-offs for held notes, sustain up,
CC 123) runs on every exit path through `close()`.
"""

from __future__ import annotations

import heapq
import itertools
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import mido

from realtime import constants as C
from realtime.codec import NoteEvent

GUARD_TAG = -1  # tag of the scheduler's own max-duration note-offs: never cancelled by the stream


@dataclass(order=True)
class _Item:
    due: float
    seq: int
    msg: mido.Message = field(compare=False)
    tag: int = field(compare=False, default=GUARD_TAG)
    guard: int = field(compare=False, default=0)  # note-on serial a guard note-off belongs to (0: not a guard)


class OutputScheduler:
    """Sends messages at their due time from a dedicated thread (or `process_due` driven by hand in tests)."""

    def __init__(
        self,
        send: Callable[[mido.Message], None],
        channel: int = 0,
        max_note_s: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
        on_sent: Callable[[mido.Message, float, int], None] | None = None,
    ):
        self._send = send
        self.channel = channel
        self.max_note_s = max_note_s
        self.clock = clock
        self.on_sent = on_sent
        self._heap: list[_Item] = []
        self._seq = itertools.count(1)
        self._cond = threading.Condition()
        self._send_lock = threading.RLock()  # dispatch and all_notes_off never interleave
        self._held: dict[int, int] = {}  # sounding pitch -> serial of its note-on
        self._pedal = False
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._closed = False
        self.sent = 0
        self.send_errors = 0
        self.guard_offs = 0  # notes the max_note_s guard had to end (the token stream should end them first)

    # ------------------------------------------------------------ queue

    def schedule(self, due: float, msg: mido.Message, tag: int = GUARD_TAG, guard: int = 0) -> None:
        """Queue `msg` for session time `due` (seconds; the past means now)."""
        with self._cond:
            if self._closed or self._stopping:
                return
            heapq.heappush(self._heap, _Item(due, next(self._seq), msg, tag, guard))
            self._cond.notify()

    def schedule_event(self, event: NoteEvent, tag: int) -> None:
        """Queue a decoded model event on the output channel; one already due is sent from the calling thread
        at once (no hand-over to the scheduler thread, which may be waiting for the GIL)."""
        msg = event_message(event, self.channel)
        if msg is None:
            return
        self.schedule(event.time, msg, tag)
        now = self.clock()
        if event.time <= now:
            self.process_due(now)

    def cancel_from(self, tag: int) -> int:
        """Drop pending events tagged >= `tag` (output taken back), except note-offs of notes now sounding.

        Returns:
            The number of events dropped.
        """
        with self._cond:
            keep = [it for it in self._heap if it.tag < tag or self._is_needed_off(it.msg)]
            dropped = len(self._heap) - len(keep)
            heapq.heapify(keep)
            self._heap = keep
            self._cond.notify()
        return dropped

    def _is_needed_off(self, msg: mido.Message) -> bool:
        return is_note_off(msg) and msg.note in self._held

    def pending(self, include_guards: bool = False) -> int:
        """Events still queued (guards excluded unless asked)."""
        with self._cond:
            return sum(1 for it in self._heap if include_guards or not it.guard)

    def next_due(self) -> float | None:
        """Session time of the next queued non-guard event, or None."""
        with self._cond:
            dues = [it.due for it in self._heap if not it.guard]
        return min(dues) if dues else None

    # ------------------------------------------------------------ sending

    def process_due(self, now: float) -> int:
        """Send everything due by `now`. Returns the number of messages sent."""
        with self._cond:
            due = []
            while self._heap and self._heap[0].due <= now:
                due.append(heapq.heappop(self._heap))
        before = self.sent
        for item in due:
            self._dispatch(item)
        return self.sent - before

    def _dispatch(self, item: _Item) -> None:
        msg = item.msg
        with self._send_lock:
            if item.guard:
                if self._held.get(msg.note) == item.guard:
                    del self._held[msg.note]
                    self.guard_offs += 1
                    self._emit(msg, item.tag)
            elif is_note_on(msg):
                if msg.note in self._held:  # re-strike: end the sounding note first
                    self._emit(mido.Message("note_off", channel=msg.channel, note=msg.note), item.tag)
                serial = next(self._seq)
                self._held[msg.note] = serial
                self._emit(msg, item.tag)
                off = mido.Message("note_off", channel=msg.channel, note=msg.note)
                self.schedule(self.clock() + self.max_note_s, off, GUARD_TAG, guard=serial)
            elif is_note_off(msg):
                if self._held.pop(msg.note, None) is not None:
                    self._emit(msg, item.tag)
            else:
                if msg.type == "control_change" and msg.control == C.CC_SUSTAIN:
                    self._pedal = msg.value >= C.PEDAL_DOWN_MIN
                self._emit(msg, item.tag)

    def _emit(self, msg: mido.Message, tag: int) -> None:
        try:
            self._send(msg)
        except Exception as err:  # a vanished port must not kill the scheduler; later sends may work again
            self.send_errors += 1
            if self.send_errors == 1:
                print(f"jam: MIDI send failed: {err}", file=sys.stderr)
            return
        self.sent += 1
        if self.on_sent is not None:
            self.on_sent(msg, self.clock(), tag)

    def all_notes_off(self) -> int:
        """Clear the queue, end every sounding note explicitly, lift the pedal, send CC 123. Returns notes ended."""
        with self._cond:
            self._heap.clear()
        with self._send_lock:
            held = sorted(self._held)
            for note in held:
                self._emit(mido.Message("note_off", channel=self.channel, note=note), GUARD_TAG)
            self._held.clear()
            if self._pedal:
                self._emit(mido.Message("control_change", channel=self.channel, control=C.CC_SUSTAIN), GUARD_TAG)
                self._pedal = False
            self._emit(mido.Message("control_change", channel=self.channel, control=C.CC_ALL_NOTES_OFF), GUARD_TAG)
        return len(held)

    @property
    def held(self) -> set[int]:
        """Pitches sounding on the output now."""
        with self._send_lock:
            return set(self._held)

    # ------------------------------------------------------------ thread

    def start(self) -> OutputScheduler:
        """Start the sending thread."""
        self._thread = threading.Thread(target=self._run, name="jam-scheduler", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._stopping and not (self._heap and self._heap[0].due <= self.clock()):
                    wait = self._heap[0].due - self.clock() if self._heap else None
                    self._cond.wait(wait)
                if self._stopping:
                    return
            self.process_due(self.clock())

    def close(self) -> None:
        """Stop the thread, then all-notes-off. Safe to call more than once and from any exit path."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=2.0)
        if not self._closed:
            self.all_notes_off()
            self._closed = True

    def __enter__(self) -> OutputScheduler:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


def is_note_on(msg: mido.Message) -> bool:
    return msg.type == "note_on" and msg.velocity > 0


def is_note_off(msg: mido.Message) -> bool:
    return msg.type == "note_off" or (msg.type == "note_on" and msg.velocity == 0)


def event_message(event: NoteEvent, channel: int) -> mido.Message | None:
    """A decoded event as a MIDI message (velocity clamped to 1..127), or None if it has no wire form."""
    if event.kind == "on":
        velocity = max(1, min(C.MIDI_MAX, event.velocity))
        return mido.Message("note_on", channel=channel, note=event.pitch, velocity=velocity)
    if event.kind == "off":
        return mido.Message("note_off", channel=channel, note=event.pitch)
    if event.kind in ("pedal_on", "pedal_off"):
        value = C.MIDI_MAX if event.kind == "pedal_on" else 0
        return mido.Message("control_change", channel=channel, control=C.CC_SUSTAIN, value=value)
    return None
