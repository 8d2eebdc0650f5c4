"""Note events <-> MIDILike token ids, one event at a time.

Human input becomes base tokens (`TimeShift_*` for the time since the stream's end, quantized to the tokenizer's
finest beat grid at the session tempo, then `NoteOn_p Velocity_v` or `NoteOff_p`), BPE-encoded per batch.
Model output is decoded id by id through a precomputed table (id -> base-token operations), so a generated id
turns into MIDI events immediately. A token that does not decode (a Velocity with no NoteOn before it, a NoteOn
not followed by a Velocity, TimeSig/Program tokens) is skipped, never raised. Drum tokens parse to ("drum", pitch)
ops, which sound nothing here (the partner plays piano) and which the grammar never samples.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from realtime import constants as C
from realtime.bundle_format import special_ids

# Decode operations: ("shift", beats) | ("on", pitch) | ("vel", velocity) | ("off", pitch) | ("pedal", 0/1) | ("eos",)
# | ("drum", pitch)
Op = tuple


@dataclass(frozen=True, slots=True)
class NoteEvent:
    """One musical event. `time` is session seconds (monotonic clock) for input, or the scheduled time for output."""

    kind: str  # "on" | "off" | "pedal_on" | "pedal_off"
    pitch: int = 0
    velocity: int = 0
    time: float = 0.0


def _parse(token: str) -> Op | None:
    kind, _, value = token.partition("_")
    try:
        if kind == "TimeShift":
            beat, pos, res = (int(x) for x in value.split("."))
            return ("shift", beat + pos / res)
        if kind == "NoteOn":
            return ("on", int(value))
        if kind == "Velocity":
            return ("vel", int(value))
        if kind == "NoteOff":
            return ("off", int(value))
        if kind in ("Pedal", "PedalOff"):
            return ("pedal", int(kind == "Pedal"))
        if kind in ("DrumOn", "DrumOff"):  # miditok's MIDILike vocabulary holds them; piano training data never does
            return ("drum", int(value))
    except ValueError:
        return None
    return ("eos",) if token == C.EOS_TOKEN else None


@dataclass
class Decoder:
    """Streaming parser state: a NoteOn waits for its Velocity."""

    pending_pitch: int | None = None

    def feed(self, ops: tuple[Op, ...]) -> list[Op]:
        """Turn base-token ops into complete ones: ("shift", b), ("note", p, v), ("off", p), ("pedal", x), ("eos",)."""
        out: list[Op] = []
        for op in ops:
            if op[0] == "vel":
                if self.pending_pitch is not None:
                    out.append(("note", self.pending_pitch, op[1]))
                self.pending_pitch = None
                continue
            self.pending_pitch = op[1] if op[0] == "on" else None  # a NoteOn not followed by Velocity is dropped
            if op[0] != "on":
                out.append(op)
        return out


@dataclass
class TokenCodec:
    """Everything the runner needs from a miditok MIDILike tokenizer, precomputed for speed."""

    tokenizer: object
    vocab: dict[str, int] = field(init=False)
    ops: list[tuple[Op, ...]] = field(init=False)  # per model id: its base tokens parsed
    pure_shift: list[bool] = field(init=False)  # per model id: only TimeShift tokens (nothing audible)

    def __post_init__(self) -> None:
        tok = self.tokenizer
        self.vocab = dict(tok.vocab)  # base token -> base id
        ids = special_ids(tok)
        self.pad_id, self.bos_id, self.eos_id = ids["pad_id"], ids["bos_id"], ids["eos_id"]
        self.vocab_size = len(tok)
        self.pitches = {int(t.split("_")[1]) for t in self.vocab if t.startswith("NoteOn_")}
        self.velocities = sorted(int(t.split("_")[1]) for t in self.vocab if t.startswith("Velocity_"))
        self.has_pedal = "Pedal_0" in self.vocab
        shifts = {}
        for token in self.vocab:
            op = _parse(token)
            if op and op[0] == "shift":
                shifts[token] = op[1]
        self.step = min(shifts.values())  # beats: the finest time grid
        self.shifts = sorted(((round(b / self.step), t) for t, b in shifts.items()), reverse=True)  # (steps, token)
        self.ops, self.pure_shift = [], []
        for i in range(self.vocab_size):
            ops = tuple(op for op in (_parse(t) for t in self._pieces(i)) if op is not None)
            self.ops.append(ops)
            self.pure_shift.append(bool(ops) and all(op[0] == "shift" for op in ops))

    def _pieces(self, token_id: int) -> list[str]:
        """Base tokens making up one model id (itself without BPE)."""
        if not self.tokenizer.is_trained:
            return [self.tokenizer[token_id]]
        from miditok import TokSequence

        seq = TokSequence(ids=[token_id], are_ids_encoded=True)
        try:
            self.tokenizer.decode_token_ids(seq)
        except (KeyError, IndexError):
            return []
        return list(seq.tokens)

    @property
    def prefix_tokens(self) -> list[str]:
        """What every training piece starts with: BOS (and TimeSig_4/4 when the tokenizer writes it)."""
        return [C.BOS_TOKEN] + ([C.TIME_SIG_TOKEN] if C.TIME_SIG_TOKEN in self.vocab else [])

    def shift_tokens(self, beats: float) -> tuple[list[str], float]:
        """TimeShift tokens for `beats` rounded to the grid. Returns (tokens, beats they add up to)."""
        steps = max(0, round(beats / self.step))
        total, out = steps, []
        for size, token in self.shifts:
            while steps >= size:
                out.append(token)
                steps -= size
        return out, (total - steps) * self.step

    def event_tokens(self, event: NoteEvent) -> list[str]:
        """Base tokens for one human event; [] when the tokenizer has no token for it (out of range)."""
        if event.kind in ("pedal_on", "pedal_off"):
            return ["Pedal_0" if event.kind == "pedal_on" else "PedalOff_0"] if self.has_pedal else []
        if event.pitch not in self.pitches:
            return []
        if event.kind == "off":
            return [f"NoteOff_{event.pitch}"]
        velocity = min(self.velocities, key=lambda v: abs(v - event.velocity))
        return [f"NoteOn_{event.pitch}", f"Velocity_{velocity}"]

    def encode(self, tokens: list[str]) -> list[int]:
        """Base tokens -> model ids (BPE-merged when the tokenizer is trained)."""
        if not tokens:
            return []
        ids = [self.vocab[t] for t in tokens]
        if not self.tokenizer.is_trained:
            return ids
        from miditok import TokSequence

        seq = TokSequence(tokens=list(tokens), ids=ids)
        self.tokenizer.encode_token_ids(seq)
        return list(seq.ids)
