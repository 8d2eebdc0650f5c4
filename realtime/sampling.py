"""THE sampler: the project's grammar, then temperature, top-k and top-p as transformers' warpers filter, and a draw.

`jam play` (through `realtime.engine.Engine`) and `jam evaluate` (which drives the same engine) sample every token
here, so what is evaluated is what is heard. The grammar constraint (`GrammarProcessor`) bans, per step:
- PAD, BOS, ids the tokenizer cannot decode (padded embedding rows) and drum hits; EOS unless the chunk may end;
- after a NoteOn, everything but a Velocity (MIDILike's NoteOn is followed by its Velocity);
- at an answer's start, ids that do not open with a NoteOn (the leading-NoteOn rule: a leading rest is latency);
- the note-ending rule (decoding never leaves a note sounding): while a model note sounds, ids whose time shifts
  would carry it past the note limit; once it has reached the limit, everything but an id opening with its NoteOff;
- ids that turn off a pitch no model note holds: such a NoteOff ends nothing (the decoder drops it). Their
  probability is not spread over every other id (as banning alone would) but moved onto the NoteOffs of the notes
  that do sound, in proportion to theirs: the model says *that* a note ends more reliably than *which* (a small
  model is unsure of the pitch), so the chance that some note ends now is the model's own. Measured on the demo
  (classical adapter, 24 evaluation samples): banning alone left notes of 2.6 beats on average (median 1.6) with
  14 sounding at every onset; with the mass moved, 1.2 (median 0.5, the real pieces' median) and 6.5 (real: ~4).
  Before either, the fine-tunes' notes lasted 2.8 beats and ~15 sounded at every onset;
- (the engine's polyphony rule) ids that start a note while `max_polyphony` model notes sound: the training
  corpus's 99.5th percentile of notes sounding at an onset (9 on the demo corpus; its real pieces' mean is 4.0).
  Measured on the demo's classical adapter (48 samples, with the NoteOff rule above): without it 6.8 notes sounded
  at an onset on average (90th percentile 12, 99th 18) and notes lasted 1.3 beats; with it 5.1 (90th 9) and 0.95
  (median 0.5; the real pieces' 0.58 and 0.48);
- a Velocity anywhere but right after a NoteOn (it sets nothing: the decoder drops it);
- ids that strike a key the model still holds (a piano key sounds once; the corpus has no such overlaps, and the
  decoder would pair the NoteOff with the newer onset, leaving a note without duration). Their probability moves
  onto that key's NoteOffs: wanting to play a held pitch again is wanting it released first. Measured on the demo's
  classical adapter (40 samples, with the two rules above): notes 0.95 -> 0.70 beats (median 0.5 -> 0.38; the real
  pieces' 0.58 and 0.48), 5.1 -> 4.1 sounding at an onset (real: 4.0).

A step is `GrammarProcessor.prepare` (the stream's state as masks), then `sample_token`: the grammar's probability
moves and the draw run compiled (realtime/kernels.py `grammar_masks`, `sample`: two calls where numpy's masks and
torch's warpers, sort, softmax and multinomial made ~40; per generated id of the demo model's engine loop, `prepare`
0.10 -> 0.05 ms and `sample_token` 0.41 -> 0.08 ms; bench/sampler.py times the parts). The filters
keep the ids transformers' `TemperatureLogitsWarper`, `TopKLogitsWarper` and `TopPLogitsWarper` keep (tested
against them), without importing transformers in the runner (0.6 s of every start). The draw takes a uniform number
from the caller's numpy generator (the engine's, reseeded per evaluation sample), inverse-CDF over the kept ids.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch

from realtime import kernels

SHIFT_EPS = 1e-6  # beats: a shift landing exactly on the note limit is allowed
PITCHES = 128  # MIDI


@dataclass
class Sampling:
    """Sampling controls; top_k=0 and top_p=1 disable those filters."""

    temperature: float = 1.0
    top_p: float = 0.95
    top_k: int = 0
    seed: int | None = None


class GrammarProcessor:
    """The token grammar; `prepare` sets what the next step may sample (`banned`) and which probability moves.

    Masks are precomputed per vocabulary (bool, True = banned): per rule a row, per pitch a row of the ids that
    open with its NoteOff, end it, or strike it. A step combines them in one compiled pass (realtime/kernels.py
    `grammar_masks`; in numpy it was a few dozen ORs and ANDs of ~1-2 us each: bench/sampler.py).
    """

    def __init__(self, ops: list[tuple], pad_id: int, bos_id: int, eos_id: int, model_vocab: int):
        size = max(model_vocab, len(ops))
        self.base = np.zeros(size, dtype=bool)
        self.base[[pad_id, bos_id]] = True
        self.base[len(ops) :] = True  # padded embedding rows: ids the tokenizer cannot decode
        # drum hits: nothing the piano partner can sound, yet evaluation's decoder would count them as notes (a
        # random or barely trained model samples them: zero-length notes, pitches off the piano)
        self.base |= _any_op(ops, "drum", size)
        self.no_eos = self.base.copy()
        self.no_eos[eos_id] = True
        self.lead = self.no_eos | ~_first_op(ops, "on", size)
        self.vel = self.no_eos | ~_first_op(ops, "vel", size)
        self.vel_first = ~self.vel & ~self.no_eos  # a Velocity with no NoteOn before it: the decoder drops it
        self.shift_beats = np.zeros(size, dtype=np.float32)  # beats each id moves time by (padded rows: 0)
        self.shift_beats[: len(ops)] = [sum(op[1] for op in o if op[0] == "shift") for o in ops]
        self.off_first: dict[int, np.ndarray] = {}  # pitch -> (size,) bool: ids opening with NoteOff_pitch
        for i, first in enumerate(o[0] if o else None for o in ops):
            if first is not None and first[0] == "off":
                self.off_first.setdefault(first[1], np.zeros(size, dtype=bool))[i] = True
        self.empty_note = _empty_note(ops, size)  # ids that end a note at its onset: NoteOn_p Velocity NoteOff_p
        self.ends = _first_of(ops, size, "off", "on")  # pitch -> ids turning off a `pitch` they did not turn on
        self.strikes = _first_of(ops, size, "on", "off")  # pitch -> ids striking `pitch` before any NoteOff of it
        self.any_strike = _any_op(ops, "on", size)  # ids that start a note
        self.any_end = np.logical_or.reduce(list(self.ends.values())) if self.ends else np.zeros(size, dtype=bool)
        per_pitch = np.zeros((3, PITCHES, size), dtype=bool)
        for row, table in enumerate((self.off_first, self.ends, self.strikes)):
            for pitch, mask in table.items():
                if 0 <= pitch < PITCHES:
                    per_pitch[row, pitch] = mask
        self._per_pitch = per_pitch
        self._rows = np.stack(
            [self.base, self.no_eos, self.lead, self.vel, self.empty_note | self.vel_first, self.any_end,
             self.any_strike]
        )  # fmt: skip
        self.banned = self.no_eos
        # this step's probability moves, each from its first mask onto its second: (2, size) (ids ending no sounding
        # note, ids ending one) or (0, size) for none; (2, k, size) per held key (ids striking it again, its NoteOffs)
        self.moves = (np.zeros((0, size), dtype=bool), np.zeros((2, 0, size), dtype=bool))

    def prepare(
        self,
        pending_velocity: bool,
        leading: bool,
        allow_eos: bool,
        overdue: Iterable[int] = (),
        shift_budget: float | None = None,
        just_started: Iterable[int] = (),
        sounding: Iterable[int] = (),
        strikes: bool = True,
    ) -> None:
        """Set the next step's mask from the stream's state.

        Args:
            pending_velocity: a NoteOn was just sampled (its Velocity must follow).
            leading: an answer's first id (it must open with a NoteOn).
            allow_eos: the chunk may end here.
            overdue: model pitches that have sounded the note limit (their NoteOff is forced).
            shift_budget: beats the longest-sounding model note may still sound (None: no model note sounds).
            just_started: model pitches whose oldest sounding note began at the stream's end (their NoteOff now
                would make a note without duration, which MIDI cannot hold).
            sounding: model pitches sounding now (only their NoteOffs may be sampled).
            strikes: whether an id may start a note (False: continuous mode's density cap is reached, or as many
                model notes sound as the polyphony rule allows).
        """
        # the rules, in the kernel's order: a pending Velocity comes first; an overdue note's NoteOff is forced;
        # else the base mask (an answer's first id opens with a NoteOn; EOS only where the chunk may end), no empty
        # note nor stray Velocity, no shift past the note limit, no NoteOff right after its own NoteOn (any id
        # ending the pitch: BPE merges NoteOffs), no NoteOff of a silent pitch (its probability moves onto the
        # sounding notes' NoteOffs), no note at all when strikes are off, no re-strike of a held key (its
        # probability moves onto that key's NoteOffs)
        flags = np.array([pending_velocity, leading, allow_eos, strikes], dtype=np.int64)
        budget = -1.0 if shift_budget is None else shift_budget + SHIFT_EPS
        banned, transfer, restrike = kernels.grammar_masks(
            self._rows, self._per_pitch, flags, self.shift_beats, budget, _pitches(overdue), _pitches(just_started),
            _pitches(sounding),
        )  # fmt: skip
        self.banned, self.moves = banned, (transfer, restrike)

    def moved(self, scores: np.ndarray) -> np.ndarray:
        """(n,) float32 logits with this step's probability moves applied (a copy; banned ids are left as they
        are: `banned` says which to skip). The moved-from ids are banned, so their probability ends up on the
        others: each move scales its `dest` ids' probabilities by (P(source) + P(dest)) / P(dest)."""
        return kernels.moved(scores, *self.moves)


def _pitches(pitches: Iterable[int]) -> np.ndarray:
    """int64 MIDI pitches (0-127) for the kernel."""
    return np.array([p for p in pitches if 0 <= p < PITCHES], dtype=np.int64)


def _any_op(ops: list[tuple], kind: str, size: int) -> np.ndarray:
    """(size,) bool: ids holding a base token of `kind` anywhere; padded rows False."""
    mask = np.zeros(size, dtype=bool)
    mask[: len(ops)] = [any(op[0] == kind for op in o) for o in ops]
    return mask


def _first_op(ops: list[tuple], kind: str, size: int) -> np.ndarray:
    """(size,) bool: ids whose first base token is of `kind` ("on", "vel", ...); padded rows False."""
    mask = np.zeros(size, dtype=bool)
    mask[: len(ops)] = [bool(o) and o[0][0] == kind for o in ops]
    return mask


def _empty_note(ops: list[tuple], size: int) -> np.ndarray:
    """(size,) bool: ids in which a NoteOn's pitch is turned off again before any time shift."""
    mask = np.zeros(size, dtype=bool)
    for i, seq in enumerate(ops):
        started: set[int] = set()
        for op in seq:
            if op[0] == "shift":
                started.clear()
            elif op[0] == "on":
                started.add(op[1])
            elif op[0] == "off" and op[1] in started:
                mask[i] = True
    return mask


def _first_of(ops: list[tuple], size: int, kind: str, before: str) -> dict[int, np.ndarray]:
    """pitch -> (size,) bool: ids holding a `kind` op ("on"/"off") of `pitch` not preceded in the id by a `before`
    op of the same pitch."""
    out: dict[int, np.ndarray] = {}
    for i, seq in enumerate(ops):
        seen: set[int] = set()
        for op in seq:
            if op[0] == before:
                seen.add(op[1])
            elif op[0] == kind and op[1] not in seen:
                out.setdefault(op[1], np.zeros(size, dtype=bool))[i] = True
    return out


def sample_token(
    logits: torch.Tensor | np.ndarray, grammar: GrammarProcessor, sampling: Sampling, rng: np.random.Generator
) -> int:
    """One id drawn from (vocab,) logits: the grammar's moves and bans (as prepared), then the sampling controls."""
    scores = logits.numpy(force=True) if isinstance(logits, torch.Tensor) else logits
    u = rng.random()
    return int(kernels.sample(scores, grammar.banned, *grammar.moves, sampling.temperature, sampling.top_k,
                              sampling.top_p, u))  # fmt: skip
