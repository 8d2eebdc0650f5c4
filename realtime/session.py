"""A jam session: input thread -> queue -> generation thread -> scheduler thread -> output.

Modes:
- call_response: the human plays a phrase; when it ends (no key down for `silence_gap_s`, or the `trigger_cc`
  controller is pressed) the model answers for `response_bars` bars, then listens again. Playing over the answer
  takes back what has not sounded yet (barge-in).
- continuous: once the human has started, the model keeps `lookahead_s` of music planned ahead; each human event
  takes back the unplayed plan, is appended to the context, and the plan is regenerated around it.

Every exit path (end of input, duration, Ctrl-C, an exception in any thread) goes through `run()`'s `finally`:
generation stops, the scheduler sends all-notes-off, ports close, the recording is written.
"""

from __future__ import annotations

import contextlib
import queue
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import mido

from realtime import constants as C
from realtime.codec import NoteEvent
from realtime.density import DensityBudget
from realtime.engine import ChunkContext, Engine, StreamState
from realtime.latency import LatencyCauses, LatencyStats
from realtime.recorder import ClockTempo, SessionRecorder
from realtime.scheduler import OutputScheduler, is_note_off, is_note_on
from realtime.settings import JamSettings
from realtime.transport import Transport


@dataclass
class _Listen:
    """What the generation thread knows about the human."""

    held: set[int] = field(default_factory=set)
    last_note_at: float = 0.0
    phrase_pending: bool = False  # notes played since the last answer
    trigger_at: float | None = None  # trigger controller pressed at
    started: bool = False  # the human has played at least once
    ignored: int = 0  # messages ignored (garbage, unsupported, note-off without note-on)


class JamSession:
    """Runs one session to its end; `run()` returns the summary (latency, counts, recording path)."""

    def __init__(
        self,
        engine: Engine,
        transport: Transport,
        settings: JamSettings,
        tempo_bpm: float,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.engine, self.transport, self.settings, self.clock = engine, transport, settings, clock
        self.tempo_bpm = tempo_bpm
        self.stats = LatencyStats()
        self.causes = LatencyCauses()  # continuous mode: where each latency went
        self.recorder = SessionRecorder()
        self.scheduler = OutputScheduler(
            transport.send, settings.out_channel, settings.max_note_s, clock, on_sent=self._on_sent
        )
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._human_note = threading.Event()  # a note-on arrived since the generation thread last looked
        self._human_event = threading.Event()  # any message arrived (continuous mode re-plans around each)
        self._stop = threading.Event()
        self._done = threading.Event()
        self._listen = _Listen()
        self._clock_tempo = ClockTempo()
        self._state: StreamState | None = None
        self._chunk_trigger: float | None = None  # trigger time of the answer whose first note is awaited
        self._chunk_serial = 0
        self._playing_until = 0.0  # session seconds the planned output runs to
        self._pre_rest: tuple[int, float] | None = None  # (ids, cursor before): silence appended ahead of time
        self.error: BaseException | None = None
        self.recorded: Path | None = None  # where the session was written, once it has been
        self.responses = 0
        self.forced_offs = 0  # NoteOffs the note-ending rule forced in the token stream
        self.started_at = 0.0
        cap = settings.mode == "continuous" and settings.density_ratio is not None
        self._density = DensityBudget(settings.density_ratio, settings.density_window_beats) if cap else None

    # ------------------------------------------------------------ threads

    def _on_input(self, msg: mido.Message, at: float) -> None:
        """Transport thread: stamp, queue, flag note-ons. Nothing else, so input is never held up."""
        self._inbox.put((at, msg))
        self._human_event.set()
        if is_note_on(msg):
            self._human_note.set()

    def _on_sent(self, msg: mido.Message, at: float, tag: int) -> None:
        """Scheduler thread: record, and measure an answer's latency at its first sounding note."""
        self.recorder.add("model", msg, at)
        trigger = self._chunk_trigger
        if trigger is not None and tag >= self._chunk_serial and is_note_on(msg):
            self._chunk_trigger = None
            self.stats.add_latency(at - trigger)

    def run(self) -> dict:
        """Run until the input ends, `duration_s` passes, Ctrl-C or an error; always cleans up."""
        self.started_at = self.clock()
        worker = threading.Thread(target=self._generate_loop, name="jam-generate", daemon=True)
        try:
            self._state = self.engine.start(self.started_at, self.tempo_bpm)
            self.scheduler.start()
            self.transport.start(self._on_input)
            worker.start()
            while not self._done.wait(C.JOIN_POLL_S):
                pass
        finally:
            with _ctrl_c_deferred():  # a second Ctrl-C must not skip all-notes-off
                self._shutdown(worker)
        if self.error is not None:
            raise self.error
        return self.summary()

    def _shutdown(self, worker: threading.Thread) -> None:
        self._stop.set()
        try:
            if worker.is_alive():
                worker.join(timeout=C.SHUTDOWN_JOIN_S)
        finally:
            try:
                self.scheduler.close()  # all-notes-off before the port goes away
            finally:
                self.transport.close()
                if self.settings.record is not None and worker.ident is not None:
                    self.recorded = self.recorder.save(self.settings.record, self.tempo_bpm, self.started_at)

    def stop(self) -> None:
        """Ask a running session to end (from any thread); `run()` then cleans up and returns."""
        self._stop.set()
        self._done.set()

    def summary(self) -> dict:
        """Counts and latency stats of the session so far."""
        state = self._state
        if state is not None:
            self.stats.slide_s = list(state.slide_s)
        return {
            "mode": self.settings.mode,
            "responses": self.responses,
            "human_notes": sum(1 for _, m in self.recorder.messages("human") if is_note_on(m)),
            "model_notes": sum(1 for _, m in self.recorder.messages("model") if is_note_on(m)),
            "ignored_messages": self._listen.ignored,
            "forced_note_offs": self.forced_offs,  # ended in the token stream by the note-ending rule
            "guard_note_offs": self.scheduler.guard_offs,  # ended by the scheduler's max_note_s guard (last resort)
            "tempo_bpm": round(self.tempo_bpm, 2),
            "record": str(self.recorded) if self.recorded else None,
            **self.stats.summary(),
            "latency_causes": self.causes.summary(),
        }

    def _generate_loop(self) -> None:
        try:
            while not self._stop.is_set():
                batch = self._drain(self._wake_timeout(self.clock()))
                now = self.clock()
                slides = len(self._state.slide_s)
                notes = self._handle(batch)
                if notes:
                    self._fold_in(notes, now)
                if self.settings.mode == "continuous":
                    self._keep_ahead(self.clock(), notes, (now, slides))
                else:
                    self._maybe_answer(self.clock())
                if self._finished(self.clock()):
                    break
        except BaseException as err:  # reported by run() after cleanup
            self.error = err
        finally:
            self._done.set()

    def _drain(self, timeout: float) -> list[tuple[float, mido.Message]]:
        """What the inbox holds (waiting up to `timeout` for a first message). `_human_event` is cleared once the
        wait is over, before the rest is taken: set again, it means a message this batch does not hold."""
        self._human_note.clear()
        self._human_event.clear()
        try:
            batch = [self._inbox.get(timeout=max(0.0, timeout))]
        except queue.Empty:
            return []
        self._human_event.clear()
        while True:
            try:
                batch.append(self._inbox.get_nowait())
            except queue.Empty:
                return batch

    # ------------------------------------------------------------ input

    def _handle(self, batch: list[tuple[float, mido.Message]]) -> list[NoteEvent]:
        """Update what we know about the human; return the events that become tokens."""
        notes: list[NoteEvent] = []
        for at, msg in batch:
            try:
                event = self._classify(msg, at)
            except (AttributeError, TypeError, ValueError):  # not a well-formed mido message
                event = None
                self._listen.ignored += 1
            if event is not None:
                notes.append(event)
        return notes

    def _classify(self, msg: mido.Message, at: float) -> NoteEvent | None:
        listen = self._listen
        if msg.type == "clock":
            bpm = self._clock_tempo.feed(at) if self.settings.follow_clock else None
            if bpm is not None and self._state is not None:
                self.tempo_bpm = self._state.tempo_bpm = bpm
            return None
        if is_note_on(msg):
            listen.held.add(msg.note)
            listen.last_note_at, listen.phrase_pending, listen.started = at, True, True
            self.recorder.add("human", msg, at)
            return NoteEvent("on", msg.note, msg.velocity, at)
        if is_note_off(msg):
            if msg.note not in listen.held:
                listen.ignored += 1
                return None
            listen.held.discard(msg.note)
            listen.last_note_at = at
            self.recorder.add("human", msg, at)
            return NoteEvent("off", msg.note, 0, at)
        if msg.type == "control_change":
            self.recorder.add("human", msg, at)
            pressed = msg.value >= C.PEDAL_DOWN_MIN
            if msg.control == self.settings.trigger_cc:
                listen.trigger_at = at if pressed and listen.phrase_pending else listen.trigger_at
                return None
            if msg.control == C.CC_SUSTAIN:
                return NoteEvent("pedal_on" if pressed else "pedal_off", 0, 0, at)
            return None
        listen.ignored += 1
        return None

    def _fold_in(self, notes: list[NoteEvent], now: float) -> None:
        """Take back unplayed output, then append the human's events to the context."""
        state = self._state
        if self._pre_rest is not None:  # the phrase goes on: the silence appended ahead of time did not happen
            self.engine.retract(state, *self._pre_rest)
            self._pre_rest = None
        cut = self.engine.crop_unplayed(state, now)
        if cut is not None:
            self.scheduler.cancel_from(cut)
        if self._density is not None:
            self._density.fold_in(notes, cut)
        if self.settings.mode == "call_response" and self._playing_until > now:
            self.engine.close_open_notes(state, self._emit_now)  # barge-in: the model stops and listens
            self._playing_until = now
        self.engine.append_events(state, notes)
        if self.settings.mode == "call_response":  # slide while the human plays, not when the answer is due
            self.engine.make_room(state, self.engine.max_seq_len // C.ANSWER_ROOM_DIVISOR)

    # ------------------------------------------------------------ output

    def _emit(self, event: NoteEvent, serial: int) -> None:
        if self._density is not None and event.kind == "on":
            self._density.model_on(event.time, serial)
        self.scheduler.schedule_event(event, serial)

    def _emit_now(self, event: NoteEvent, serial: int) -> None:
        self.scheduler.schedule_event(NoteEvent(event.kind, event.pitch, event.velocity, self.clock()), serial)

    def _max_tokens(self, seconds: float) -> int:
        beats = seconds * self._state.tempo_bpm / 60.0
        return max(16, int(C.MAX_TOKENS_PER_BEAT * beats))

    @property
    def _pre_rest_lead(self) -> float:
        """Seconds before the phrase deadline at which the silence is appended ahead of time."""
        return min(C.PRE_REST_LEAD_S, self.settings.silence_gap_s / 2)

    def _phrase_end(self) -> float | None:
        """When the current phrase counts as ended (session seconds), or None if no phrase is pending."""
        listen, gap = self._listen, self.settings.silence_gap_s
        if not listen.phrase_pending:
            return None
        if listen.trigger_at is not None:
            return listen.trigger_at
        factor = C.HELD_KEYS_GAP_FACTOR if listen.held else 1.0
        return listen.last_note_at + gap * factor

    def _maybe_answer(self, now: float) -> None:
        end = self._phrase_end()
        if end is None:
            return
        state = self._state
        if now < end:
            if self._pre_rest is None and now >= end - self._pre_rest_lead:
                # Shortly before the deadline the silence up to it goes into the context, off the latency path;
                # if the human plays on, it is retracted (`_fold_in`).
                before = state.cursor
                self._pre_rest = (self.engine.append_rest(state, end), before)
            return
        if self._pre_rest is None:
            self.engine.append_rest(state, now)
        self._pre_rest = None
        state.cursor = now
        seconds = self.settings.response_bars * self.settings.beats_per_bar * 60.0 / state.tempo_bpm
        self._chunk_serial, self._chunk_trigger = state.next_serial, end
        ctx = ChunkContext(
            until=now + seconds,
            max_tokens=self._max_tokens(seconds),
            allow_eos=True,
            drop_leading_rest=True,
            should_stop=self._human_note.is_set,
            on_event=self._emit,
        )
        state, res = self.engine.generate_chunk(state, ctx)
        self.engine.close_open_notes(state, self._emit)
        self.stats.add_chunk(res.music_s, res.compute_s, res.tokens)
        self.forced_offs += res.forced_offs
        if not any(e.kind == "on" for e in res.events):
            self._chunk_trigger = None  # nothing to measure: the model answered with silence
        self._listen.phrase_pending, self._listen.trigger_at = False, None
        self._playing_until = state.cursor
        self.responses += 1

    def _keep_ahead(self, now: float, folded: list[NoteEvent], drained: tuple[float, int]) -> None:
        """Plan `lookahead_s` ahead; any human message stops the plan (it is taken back and re-planned around it).

        Args:
            drained: (when the batch was taken from the inbox, slides before it was folded in), for the causes.
        """
        if not self._listen.started or (self.transport.input_done.is_set() and not folded):
            return
        state, ahead = self._state, self.settings.lookahead_s
        state.cursor = max(state.cursor, now)  # fell behind (or idle): never plan into the past
        if not folded and state.cursor - now >= ahead / 2:
            return
        trigger, slides = (min(e.time for e in folded) if folded else now), len(state.slide_s)
        ctx = ChunkContext(
            until=now + ahead,
            max_tokens=self._max_tokens(ahead),
            should_stop=self._human_event.is_set,
            on_event=self._emit,
            max_onsets=self._density.onsets_left(now, state.tempo_bpm) if self._density is not None else None,
        )
        state, res = self.engine.generate_chunk(state, ctx)
        self.stats.add_chunk(res.music_s, res.compute_s, res.tokens)
        self.forced_offs += res.forced_offs
        if res.first_event_at is not None:
            self.stats.add_latency(res.first_event_at - trigger)
            if folded:  # a slide while planning counts up to the first event (after it, it is not latency)
                in_fold, in_plan = sum(state.slide_s[drained[1] : slides]), sum(state.slide_s[slides:])
                plan = res.first_event_at - now
                self.causes.add(queue=drained[0] - trigger, fold_in=now - drained[0] - in_fold,
                                slide=in_fold + min(in_plan, plan), plan=plan - min(in_plan, plan))  # fmt: skip
        self._playing_until = state.cursor
        self.responses += 1
        if self._inbox.empty():  # slide now, between events, rather than inside the next fold-in or plan
            self.engine.make_room(state, self.engine.max_seq_len // C.ANSWER_ROOM_DIVISOR)

    # ------------------------------------------------------------ timing

    def _wake_timeout(self, now: float) -> float:
        """Seconds the generation thread may wait for input before it has something to do."""
        if self.settings.mode == "continuous":
            if self._listen.started and not self.transport.input_done.is_set():
                return min(C.IDLE_POLL_S, self._state.cursor - self.settings.lookahead_s / 2 - now)
            return C.IDLE_POLL_S
        end = self._phrase_end()
        if end is None:
            return C.IDLE_POLL_S
        wake = end if self._pre_rest is not None else end - self._pre_rest_lead
        return min(C.IDLE_POLL_S, wake - now)

    def _finished(self, now: float) -> bool:
        duration = self.settings.duration_s
        if duration is not None and now - self.started_at >= duration:
            return True
        answer_due = self.settings.mode == "call_response" and self._listen.phrase_pending
        if not self.transport.input_done.is_set() or answer_due:
            return False
        last = max(self._listen.last_note_at, self._playing_until)
        return self.scheduler.next_due() is None and now >= last + self.settings.tail_s


@contextlib.contextmanager
def _ctrl_c_deferred() -> Iterator[None]:
    """Ignore SIGINT for the duration (main thread only: signal handlers live there)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
