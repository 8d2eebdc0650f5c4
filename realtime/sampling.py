"""THE sampler: temperature/top-k/top-p warpers (transformers' arithmetic, op for op) plus the project's grammar.

`jam play` (through `realtime.engine.Engine`) and `jam evaluate` (which drives the same engine) sample every token
here, so what is evaluated is what is heard. The grammar constraint (`GrammarProcessor`) bans, per step:
- PAD, BOS and ids the tokenizer cannot decode (padded embedding rows); EOS unless the chunk may end;
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

Processors are called directly on one (1, vocab) row, `processor(None, scores)` as transformers' are. The warpers
are written out here (a few lines each, tested equal to transformers' `TemperatureLogitsWarper`, `TopKLogitsWarper`
and `TopPLogitsWarper` bit for bit) so that the runner does not import transformers: 0.6 s of every start.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

SHIFT_EPS = 1e-6  # beats: a shift landing exactly on the note limit is allowed


@dataclass
class Sampling:
    """Sampling controls; top_k=0 and top_p=1 disable those filters."""

    temperature: float = 1.0
    top_p: float = 0.95
    top_k: int = 0
    seed: int | None = None


class LogitsProcessor(Protocol):
    """transformers' processor call: `(input_ids or None, scores (1, vocab)) -> scores`."""

    def __call__(self, input_ids: torch.Tensor | None, scores: torch.Tensor) -> torch.Tensor: ...


@dataclass(frozen=True)
class Temperature:
    temperature: float

    def __call__(self, input_ids: torch.Tensor | None, scores: torch.Tensor) -> torch.Tensor:
        return scores / self.temperature


@dataclass(frozen=True)
class TopK:
    top_k: int

    def __call__(self, input_ids: torch.Tensor | None, scores: torch.Tensor) -> torch.Tensor:
        kth = torch.topk(scores, min(self.top_k, scores.size(-1)))[0][..., -1, None]
        return scores.masked_fill(scores < kth, -float("inf"))


@dataclass(frozen=True)
class TopP:
    top_p: float

    def __call__(self, input_ids: torch.Tensor | None, scores: torch.Tensor) -> torch.Tensor:
        sorted_logits, sorted_indices = torch.sort(scores, descending=False)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        remove = cumulative <= (1 - self.top_p)
        remove[..., -1:] = 0  # the most likely id always stays
        return scores.masked_fill(remove.scatter(1, sorted_indices, remove), -float("inf"))


def warpers(sampling: Sampling) -> list[LogitsProcessor]:
    """Warpers for the enabled controls, in transformers `generate`'s order (temperature, top-k, top-p)."""
    out: list[LogitsProcessor] = []
    if sampling.temperature != 1.0:
        out.append(Temperature(sampling.temperature))
    if sampling.top_k > 0:
        out.append(TopK(sampling.top_k))
    if sampling.top_p < 1.0:
        out.append(TopP(sampling.top_p))
    return out


class GrammarProcessor:
    """The token grammar as a logits processor; `prepare` sets what the next step may sample.

    Masks are precomputed per vocabulary (bool, True = banned) as numpy arrays: a step is a few dozen ORs and ANDs
    over vocabulary-long rows and a few small reductions, each ~1-2 us in numpy against ~3-5 us of torch dispatch
    (bench/sampler.py, 1024 ids, 4 notes held: `prepare` 0.074-0.081 -> 0.030 ms, the call 0.137-0.155 -> 0.066;
    the same ids drawn). The scores come in and go out as torch tensors, viewed without a copy on the CPU.
    """

    def __init__(self, ops: list[tuple], pad_id: int, bos_id: int, eos_id: int, model_vocab: int):
        size = max(model_vocab, len(ops))
        self.base = np.zeros(size, dtype=bool)
        self.base[[pad_id, bos_id]] = True
        self.base[len(ops) :] = True  # padded embedding rows: ids the tokenizer cannot decode
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
        self.banned = self.no_eos
        # (1, size) masks (ids ending no sounding note, ids ending one) this step: the first's probability moves on
        self.transfer: tuple[np.ndarray, np.ndarray] | None = None
        # (k, size) masks per held pitch: (ids striking it again, ids ending it): the first's probability moves on
        self.restrike: tuple[np.ndarray, np.ndarray] | None = None

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
        self.transfer = self.restrike = None
        if pending_velocity:
            self.banned = self.vel
            return
        forced = [self.off_first[p] for p in overdue if p in self.off_first]
        if forced:
            self.banned = self.no_eos | ~np.logical_or.reduce(forced)
            return
        banned = (self.lead if leading else self.base if allow_eos else self.no_eos) | self.empty_note | self.vel_first
        if shift_budget is not None and not leading:
            banned = banned | (self.shift_beats > shift_budget + SHIFT_EPS)
        for pitch in just_started:  # any id ending it, not only one opening with its NoteOff (BPE merges NoteOffs)
            if pitch in self.ends:
                banned = banned | self.ends[pitch]
        held = list(sounding)
        may_end = [self.ends[p] for p in held if p in self.ends]
        useful = np.logical_or.reduce(may_end) if may_end else np.zeros_like(banned)
        wrong = self.any_end & ~useful & ~banned
        banned = banned | (self.any_end & ~useful)
        if not strikes and not leading:
            banned = banned | self.any_strike
        restrikes = [self.strikes[p] for p in held if p in self.strikes]
        self.banned = banned | np.logical_or.reduce(restrikes) if restrikes else banned
        right = useful & ~self.banned
        if right.any() and wrong.any():
            self.transfer = (wrong[None], right[None])
        pitches = [p for p in held if p in self.strikes and p in self.ends]
        if pitches:
            again = np.stack([self.strikes[p] for p in pitches]) & ~banned
            release = np.stack([self.ends[p] for p in pitches]) & ~self.banned
            keep = release.any(axis=1) & again.any(axis=1)  # a held key the model may want again
            if keep.any():
                self.restrike = (again[keep], release[keep])

    def __call__(self, input_ids: torch.LongTensor | None, scores: torch.FloatTensor) -> torch.FloatTensor:
        n = scores.shape[-1]
        x = scores.numpy(force=True)[0]  # (n,): a view on CPU
        if self.transfer is not None:  # useless NoteOffs' probability onto the useful ones
            x = _give(x, self.transfer[0][:, :n], self.transfer[1][:, :n])
        if self.restrike is not None:  # each held key's strikes' probability onto its NoteOffs
            x = _give(x, self.restrike[0][:, :n], self.restrike[1][:, :n])
        return torch.from_numpy(np.where(self.banned[:n], np.float32(-np.inf), x)[None]).to(scores.device)


def _give(scores: np.ndarray, source: np.ndarray, dest: np.ndarray) -> np.ndarray:
    """Scale each row's `dest` ids' probabilities by (P(source) + P(dest)) / P(dest), in logits.

    `scores` (n,) finite logits; `source`, `dest` (k, n) bool, every row of each non-empty. An id in several rows
    takes the largest factor. The `source` ids are banned by the caller, so their probability ends up on `dest`.
    """
    to = _row_logsumexp(scores, dest)
    factor = np.logaddexp(_row_logsumexp(scores, source), to) - to
    return scores + np.where(dest, factor[:, None], np.float32(0.0)).max(axis=0)


def _row_logsumexp(scores: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """(k,) log of the summed exp(scores) over each row's True ids (each row non-empty)."""
    picked = np.where(masks, scores, np.float32(-np.inf))
    top = picked.max(axis=1)
    return top + np.log(np.exp(picked - top[:, None]).sum(axis=1))


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
    logits: torch.Tensor, processors: Iterable[LogitsProcessor], generator: torch.Generator | None = None
) -> int:
    """One id drawn from a (vocab,) logits vector after the processors (grammar first, then warpers)."""
    x = logits.unsqueeze(0)  # (1, vocab): the processors' batch layout
    for processor in processors:
        x = processor(None, x)
    probs = torch.softmax(x[0], dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator).item())
