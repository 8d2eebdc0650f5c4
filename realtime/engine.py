"""Streaming generation over one persistent KV cache.

The token stream interleaves the human's events and the model's in time order, exactly as a MIDILike piece would.
Human events are appended as they arrive (`append_events`: a few tokens through the cached model, never the whole
context again); the model continues from there (`generate_chunk`). Every id in the window keeps its start/end
time on the session clock, so output that has not sounded yet can be taken back (`crop_unplayed`) when the human
plays over it, and the cache is cut to match. When the window would pass `max_seq_len` it slides: the last
`SLIDE_KEEP_FRACTION` of it is re-prefilled from scratch (`StreamState.slide_s` records what that costs).

Usage:
    state = engine.start(now)
    engine.append_events(state, human_events)
    state, out = engine.generate_chunk(state, ChunkContext(until=now + 2.0, on_event=send))
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from realtime import constants as C
from realtime.codec import Decoder, NoteEvent, TokenCodec
from realtime.llama import KVCache, LeanLlama
from realtime.sampling import SHIFT_EPS, GrammarProcessor, Sampling, sample_token

__all__ = ["ChunkContext", "ChunkResult", "Engine", "Sampling", "StreamState", "sample_token"]


@dataclass
class StreamState:
    """The context window, its cache and where it ends in time."""

    tempo_bpm: float
    cursor: float = 0.0  # session seconds at which the stream ends
    cache: KVCache | None = None  # keys and values of `ids` (allocated once per stream, reused by every slide)
    ids: list[int] = field(default_factory=list)  # ids in the window, oldest first
    starts: list[float] = field(default_factory=list)  # session seconds each id starts sounding (crop test)
    ends: list[float] = field(default_factory=list)  # stream cursor (session seconds) after each id
    serials: list[int] = field(default_factory=list)  # never reused over the session: output event tags
    # after each id: sounding model pitch -> onsets (session seconds) of its NoteOns not yet matched, oldest first
    model_open: list[dict[int, tuple[float, ...]]] = field(default_factory=list)
    next_serial: int = 0
    logits: np.ndarray | None = None  # (vocab,) float32 next-token logits; None: recompute lazily
    decoder: Decoder = field(default_factory=Decoder)
    slide_s: list[float] = field(default_factory=list)  # seconds spent re-prefilling at each slide

    @property
    def open_notes(self) -> frozenset:
        """Model pitches sounding at the end of the stream."""
        return frozenset(self.model_open[-1]) if self.model_open else frozenset()

    def seconds(self, beats: float) -> float:
        return beats * 60.0 / self.tempo_bpm


@dataclass
class ChunkContext:
    """What one `generate_chunk` call should do."""

    until: float  # session seconds: stop once the stream reaches this time
    max_tokens: int = 256
    allow_eos: bool = False  # True: an EOS ends the chunk; False: EOS is never sampled
    drop_leading_rest: bool = False  # an answer starts at once: its first id is one that opens with a NoteOn
    should_stop: Callable[[], bool] | None = None  # checked between tokens (e.g. the human started playing)
    on_event: Callable[[NoteEvent, int], None] | None = None  # (event, serial) as soon as it is decoded
    max_onsets: int | None = None  # note-ons this chunk may start (continuous mode's density cap); None: any


@dataclass
class ChunkResult:
    """What one chunk produced and what it cost."""

    events: list[NoteEvent] = field(default_factory=list)
    ids: list[int] = field(default_factory=list)  # the ids sampled, in order
    tokens: int = 0
    forced_offs: int = 0  # ids sampled under the note-ending rule (a note held past max_note_beats)
    music_s: float = 0.0  # seconds of music the stream advanced
    compute_s: float = 0.0
    first_event_at: float | None = None  # session seconds when the first event was handed on
    first_serial: int | None = None  # serial of the first id generated in this chunk
    stopped: str = "until"  # until | eos | max_tokens | interrupt


class Engine:
    """A causal LM plus its codec, driven one id at a time.

    `model`: the runner's forward (`LeanLlama`), or a transformers LlamaForCausalLM, which is wrapped in one over
    the same weights (evaluation passes the model it scores).
    """

    def __init__(
        self,
        model: LeanLlama | torch.nn.Module,
        codec: TokenCodec,
        max_seq_len: int,
        sampling: Sampling | None = None,
        clock: Callable[[], float] = time.monotonic,
        max_note_beats: float | None = None,
        max_polyphony: int | None = None,
    ):
        self.model = model if isinstance(model, LeanLlama) else LeanLlama.from_module(model)
        self.codec = codec
        self.max_seq_len = min(max_seq_len, self.model.shape.max_positions)
        self.sampling = sampling or Sampling()
        self.clock = clock
        self.max_note_beats = max_note_beats
        self.max_polyphony = max_polyphony  # no model note starts while this many sound (None: no limit)
        self.reseed(self.sampling.seed)
        vocab = self.model.shape.vocab
        self.grammar = GrammarProcessor(codec.ops, codec.pad_id, codec.bos_id, codec.eos_id, vocab)
        # load the compiled grammar and draw now: the first call of each costs ~40 ms (numba reads its cache),
        # which the first answer would otherwise wait for
        self.grammar.prepare(False, False, True)
        sample_token(np.zeros(vocab, np.float32), self.grammar, self.sampling, np.random.default_rng(0))

    def reseed(self, seed: int | None) -> None:
        """Restart the sampling generator at `seed` (None: a fresh random state)."""
        self.rng = np.random.default_rng(seed)

    # ------------------------------------------------------------ model calls

    def _forward(self, state: StreamState, ids: list[int]) -> None:
        if state.cache is None:
            state.cache = self.model.new_cache(self.max_seq_len)
        state.logits = self.model.next_logits(ids, state.cache)

    def _slide(self, state: StreamState, room: int) -> None:
        """Drop the window's oldest ids and re-prefill the rest so `room` more fit."""
        started = time.perf_counter()
        keep = min(int(self.max_seq_len * C.SLIDE_KEEP_FRACTION), self.max_seq_len - room)
        for name in ("ids", "starts", "ends", "serials", "model_open"):
            setattr(state, name, getattr(state, name)[-keep:] if keep > 0 else [])
        state.logits = None
        if state.cache is not None:
            state.cache.length = 0
        if state.ids:
            self._forward(state, state.ids)
        state.slide_s.append(time.perf_counter() - started)

    def _feed(self, state: StreamState, ids: list[int], start: float, end: float) -> int:
        """Run `ids` through the model after the window (sliding first if needed). Returns the first serial."""
        first = state.next_serial
        limit = max(1, self.max_seq_len // 2)
        for i in range(0, len(ids), limit):
            part = ids[i : i + limit]
            if len(state.ids) + len(part) > self.max_seq_len:
                self._slide(state, len(part))
            self._forward(state, part)
            state.ids.extend(part)
            state.starts.extend([start] * len(part))
            state.ends.extend([end] * len(part))
            state.serials.extend(range(state.next_serial, state.next_serial + len(part)))
            state.model_open.extend([state.model_open[-1] if state.model_open else {}] * len(part))
            state.next_serial += len(part)
        return first

    def make_room(self, state: StreamState, room: int) -> bool:
        """Slide now if `room` more ids would not fit, so the slide's cost is paid off the latency path.

        Returns:
            Whether the window slid.
        """
        if len(state.ids) + room <= self.max_seq_len:
            return False
        self._slide(state, min(room, self.max_seq_len // 2))
        return True

    def _ensure_logits(self, state: StreamState) -> None:
        """After a crop the next-token logits are unknown: re-run the window's last id."""
        if state.logits is not None or not state.ids:
            return
        _crop_cache(state.cache, 1)
        self._forward(state, state.ids[-1:])

    def _note_budget(self, state: StreamState) -> tuple[list[int], float | None, list[int]]:
        """The note rules' view of the stream's end: (model pitches that have sounded `max_note_beats`, beats the
        longest-sounding note may still sound or None when no model note sounds, pitches that began just now)."""
        sounding = state.model_open[-1] if state.model_open else {}
        if not sounding:
            return [], None, []
        per_beat = state.tempo_bpm / 60.0
        held = {p: (state.cursor - onsets[0]) * per_beat for p, onsets in sounding.items()}
        fresh = [p for p, beats in held.items() if beats <= SHIFT_EPS]
        if self.max_note_beats is None:
            return [], None, fresh
        overdue = [p for p, beats in held.items() if beats >= self.max_note_beats - SHIFT_EPS]
        return overdue, max(0.0, self.max_note_beats - max(held.values())), fresh

    def _sample(self, state: StreamState, allow_eos: bool, leading: bool = False, strikes: bool = True):
        """The next id and whether the note-ending rule forced it (`strikes` False: no id may start a note)."""
        self._ensure_logits(state)
        pending = state.decoder.pending_pitch is not None
        overdue, budget, fresh = ([], None, []) if pending else self._note_budget(state)
        sounding = state.model_open[-1] if state.model_open else {}
        if self.max_polyphony is not None and sum(map(len, sounding.values())) >= self.max_polyphony:
            strikes = False  # the polyphony rule: a note must end (or time pass) before another starts
        self.grammar.prepare(pending, leading, allow_eos, overdue, budget, fresh, sounding, strikes)
        return sample_token(state.logits, self.grammar, self.sampling, self.rng), bool(overdue)

    # ------------------------------------------------------------ stream edits

    def start(self, now: float, tempo_bpm: float, prompt: list[int] | None = None) -> StreamState:
        """A fresh stream ending at `now`: the piece prefix (BOS, TimeSig) prefilled, or `prompt` (ids, BOS first).

        A prompt's notes count as the human's (the note-ending rule never closes them); its time shifts move the
        stream's start back, so the stream still ends at `now`.
        """
        ids = prompt if prompt is not None else self.codec.encode(self.codec.prefix_tokens)
        beats = sum(op[1] for i in ids for op in self.codec.ops[i] if op[0] == "shift")
        state = StreamState(tempo_bpm=tempo_bpm, cursor=now)
        self._feed(state, list(ids), now - state.seconds(beats), now)
        return state

    def append_events(self, state: StreamState, events: list[NoteEvent]) -> int:
        """Append human events (time-ordered, session seconds) as tokens. Returns the number of ids appended."""
        tokens: list[str] = []
        for event in events:
            event_tokens = self.codec.event_tokens(event)
            if not event_tokens:
                continue
            shift, beats = self.codec.shift_tokens(max(0.0, event.time - state.cursor) * state.tempo_bpm / 60.0)
            tokens += shift + event_tokens
            state.cursor += state.seconds(beats)
        ids = self.codec.encode(tokens)
        if ids:  # start = when it sounded (never after `now`), so a crop never takes a human event back
            self._feed(state, ids, min(events[-1].time, state.cursor), state.cursor)
        return len(ids)

    def append_rest(self, state: StreamState, until: float) -> int:
        """Append TimeShift tokens bringing the stream up to `until` (the tokens are quantized, the cursor is not).

        Returns:
            The number of ids appended.
        """
        tokens, _ = self.codec.shift_tokens(max(0.0, until - state.cursor) * state.tempo_bpm / 60.0)
        ids = self.codec.encode(tokens)
        if ids:
            self._feed(state, ids, state.cursor, until)
        state.cursor = max(state.cursor, until)
        return len(ids)

    def retract(self, state: StreamState, count: int, cursor: float) -> None:
        """Remove the last `count` ids (e.g. a rest appended ahead of time) and put the stream end back at `cursor`."""
        count = min(count, len(state.ids))
        if count <= 0:
            return
        _crop_cache(state.cache, count)
        for name in ("ids", "starts", "ends", "serials", "model_open"):
            del getattr(state, name)[-count:]
        state.cursor, state.logits, state.decoder = cursor, None, Decoder()

    def crop_unplayed(self, state: StreamState, now: float) -> int | None:
        """Take back ids that have not sounded by `now` (and a pure rest running past it).

        Returns:
            The serial of the first id removed (output events tagged >= it should be cancelled), or None.
        """
        cut = len(state.ids)
        while cut > 0 and state.starts[cut - 1] > now:
            cut -= 1
        if cut > 0 and state.ends[cut - 1] > now and self.codec.pure_shift[state.ids[cut - 1]]:
            cut -= 1
        if cut == len(state.ids) or cut == 0:
            return None
        first = state.serials[cut]
        _crop_cache(state.cache, len(state.ids) - cut)
        state.cursor = state.ends[cut - 1]
        for name in ("ids", "starts", "ends", "serials", "model_open"):
            del getattr(state, name)[cut:]
        state.logits, state.decoder = None, Decoder()
        return first

    def close_open_notes(self, state: StreamState, on_event: Callable[[NoteEvent, int], None] | None) -> int:
        """End the model's sounding notes at the stream's end: NoteOff tokens appended, events handed on.

        A note that began at the stream's very end first sounds for one grid step (a note without duration is
        not MIDI: decoders drop or reject it).
        """
        sounding = state.model_open[-1] if state.model_open else {}
        pitches = sorted(sounding)
        if not pitches:
            return 0
        start = state.cursor
        shift = []
        if max(onsets[-1] for onsets in sounding.values()) >= state.cursor - 1e-9:
            shift = [self.codec.shifts[-1][1]]  # the smallest TimeShift
            state.cursor += state.seconds(self.codec.step)
        ids = self.codec.encode(shift + [f"NoteOff_{p}" for p in pitches for _ in sounding[p]])
        serial = self._feed(state, ids, start, state.cursor)
        state.model_open[-1] = {}
        for pitch in pitches:
            if on_event:
                on_event(NoteEvent("off", pitch, 0, state.cursor), serial)
        return len(pitches)

    # ------------------------------------------------------------ generation

    def generate_chunk(self, state: StreamState, ctx: ChunkContext) -> tuple[StreamState, ChunkResult]:
        """Sample ids until the stream reaches `ctx.until`, handing events on as soon as they decode."""
        started, begin = time.perf_counter(), state.cursor
        res = ChunkResult()
        leading, onsets = ctx.drop_leading_rest, 0  # onsets: note-ons this chunk started (the density cap)
        while state.cursor < ctx.until:
            if res.tokens >= ctx.max_tokens:
                res.stopped = "max_tokens"
                break
            if ctx.should_stop is not None and ctx.should_stop():
                res.stopped = "interrupt"
                break
            strikes = ctx.max_onsets is None or onsets < ctx.max_onsets
            token, forced = self._sample(state, ctx.allow_eos, leading, strikes)
            res.forced_offs += forced
            if token == self.codec.eos_id:
                res.stopped = "eos"
                break
            serial, start = state.next_serial, state.cursor
            res.first_serial = serial if res.first_serial is None else res.first_serial
            opened = dict(state.model_open[-1]) if state.model_open else {}
            for op in state.decoder.feed(self.codec.ops[token]):
                if op[0] == "shift":
                    state.cursor += 0.0 if leading else state.seconds(op[1])
                    continue
                event = _event(op, state.cursor, opened)
                if event is None:
                    continue
                leading, onsets = False, onsets + (event.kind == "on")
                res.events.append(event)
                if ctx.on_event is not None:
                    ctx.on_event(event, serial)
                if res.first_event_at is None:
                    res.first_event_at = self.clock()
            end = state.cursor
            self._feed(state, [token], start, end)
            state.model_open[-1] = opened
            res.ids.append(token)
            res.tokens += 1
        res.music_s = state.cursor - begin
        res.compute_s = time.perf_counter() - started
        return state, res


def _event(op: tuple, at: float, opened: dict[int, tuple[float, ...]]) -> NoteEvent | None:
    """A decoded op as an output event, updating the sounding model notes (pitch -> unmatched NoteOn onsets).

    NoteOffs match NoteOns first in, first out, as miditok decodes them (a re-struck pitch needs two NoteOffs).
    """
    if op[0] == "note":
        opened[op[1]] = (*opened.get(op[1], ()), at)
        return NoteEvent("on", op[1], op[2], at)
    if op[0] == "off":
        if op[1] not in opened:
            return None  # NoteOff of a note the model never started: nothing to send
        rest = opened.pop(op[1])[1:]
        if rest:
            opened[op[1]] = rest
        return NoteEvent("off", op[1], 0, at)
    if op[0] == "pedal":
        return NoteEvent("pedal_on" if op[1] else "pedal_off", 0, 0, at)
    return None


def _crop_cache(cache: KVCache | None, remove: int) -> None:
    """Drop the cache's last `remove` positions."""
    if cache is not None and remove > 0:
        cache.crop(remove)
