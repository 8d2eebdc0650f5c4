"""Headless latency benchmark (`jam bench latency`, bench/latency.py).

Engine level (default, seconds): the same calls the session makes, back to back on a virtual timeline. The human
is simulated (each round an 8-note phrase) or, with `input_file`, a MIDI performance (events at the same instant
arrive together, as a chord would); each event is appended as it would arrive live; then
- call_response: a phrase ends (simulated: after each phrase; a performance: where it pauses for `silence_gap_s`);
  latency = sample until the answer's first note is decoded (the silence is prefilled before, as the session does);
- continuous: each human event takes back the plan, is folded in, and `lookahead_s` is re-planned; latency = from
  the event to the first planned event.
End to end (`e2e=True`, real time): a whole `JamSession` with a MIDI file as the human (`input_file`, else
simulated phrases), threads and scheduler included; latency as the session measures it.

The result's top-level `p50_ms`, `p95_ms`, `p99_ms`, `max_ms`, `ms_per_token`, `rtf` are the end-to-end session's
when it ran, else the engine level's; `load_s` is the bundle's load time and `backend` the forward that ran.
"""

from __future__ import annotations

import platform
import random
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from realtime import constants as C
from realtime.bundle import Bundle
from realtime.codec import NoteEvent
from realtime.engine import ChunkContext, Engine, StreamState
from realtime.latency import LatencyStats
from realtime.runner import make_engine, prepare, run_jam
from realtime.settings import JamSettings
from realtime.synthetic import make_random_bundle, random_phrase, write_phrases_midi

# Ids per second of real piano music: measured 36 MIDILike base tokens/s (23 ids/s after a 1024-id BPE) on held-out
# music21 scores (Joplin, Mozart, Haydn, Beethoven, Schumann, Bach); dense ragtime reaches 63 base tokens/s. A random
# model's own output is much sparser (long rests), so its measured RTF flatters; this estimate does not.
REAL_IDS_PER_S = 25.0

# The random model benchmarked when none is given: the demo model's size (params.yaml `model:`).
DEMO_SIZE = {"hidden": 192, "layers": 4, "heads": 6, "vocab": 1024, "max_seq_len": 256}


def model_info(bundle: Bundle) -> dict:
    """Size facts of the loaded model."""
    shape = bundle.model.shape
    return {
        "hidden": shape.hidden,
        "layers": shape.layers,
        "heads": shape.heads,
        "kv_heads": shape.kv_heads,
        "vocab": shape.vocab,
        "params_m": round(bundle.model.params / 1e6, 3),
        "max_seq_len": bundle.max_seq_len,
        "adapters": bundle.adapters,
        "dtype": str(bundle.model.dtype).removeprefix("torch."),
        "quantization": bundle.model.quantization,
        "device": str(bundle.device),
    }


def _answer(engine: Engine, state: StreamState, at: float, seconds: float, stats: LatencyStats) -> float:
    """One call-and-response answer at virtual time `at`; returns where the stream ends.

    As in the session, the silence up to the deadline is prefilled just before it (not timed); the clock starts
    at the deadline.
    """
    engine.append_rest(state, at)
    triggered = time.monotonic()
    ctx = ChunkContext(until=at + seconds, max_tokens=1024, allow_eos=True, drop_leading_rest=True)
    state, res = engine.generate_chunk(state, ctx)
    engine.close_open_notes(state, None)
    stats.add_chunk(res.music_s, res.compute_s, res.tokens)
    if res.first_event_at is not None:
        stats.add_latency(res.first_event_at - triggered)
    return state.cursor


def _accompany(engine: Engine, state: StreamState, events: list, lookahead: float, stats: LatencyStats) -> None:
    """One continuous-mode fold-in of human events (one instant) at their (virtual) time."""
    at = events[0].time
    triggered = time.monotonic()
    engine.crop_unplayed(state, at)
    engine.append_events(state, events)
    state.cursor = max(state.cursor, at)
    state, res = engine.generate_chunk(state, ChunkContext(until=at + lookahead, max_tokens=1024))
    stats.add_chunk(res.music_s, res.compute_s, res.tokens)
    if res.first_event_at is not None:
        stats.add_latency(res.first_event_at - triggered)


def performance_events(path: Path) -> list[NoteEvent]:
    """A MIDI file's notes and sustain pedal as human events (seconds from the file's start), time-ordered."""
    import mido

    events, t = [], 0.0
    for msg in mido.MidiFile(str(path)):
        t += msg.time
        if msg.type == "note_on" and msg.velocity > 0:
            events.append(NoteEvent("on", msg.note, msg.velocity, t))
        elif msg.type in ("note_on", "note_off"):
            events.append(NoteEvent("off", msg.note, 0, t))
        elif msg.type == "control_change" and msg.control == C.CC_SUSTAIN:
            events.append(NoteEvent("pedal_on" if msg.value >= C.PEDAL_DOWN_MIN else "pedal_off", 0, 0, t))
    return events


def _instants(events: list[NoteEvent]) -> list[list[NoteEvent]]:
    """Events grouped by instant (within 1 ms: a chord arrives as one batch)."""
    out: list[list[NoteEvent]] = []
    for event in events:
        if out and event.time - out[-1][0].time < 1e-3:
            out[-1].append(event)
        else:
            out.append([event])
    return out


def _phrases(events: list[NoteEvent], gap_s: float) -> list[list[NoteEvent]]:
    """A performance cut where no note starts for `gap_s` (the model's turns in call-and-response)."""
    out: list[list[NoteEvent]] = [[]]
    last_on = None
    for event in events:
        if event.kind == "on" and last_on is not None and event.time - last_on >= gap_s and out[-1]:
            out.append([])
        last_on = event.time if event.kind == "on" else last_on
        out[-1].append(event)
    return out


def _human(settings: JamSettings, rounds: int, seed: int) -> list[list[NoteEvent]]:
    """Phrases of the human: the input file's (cut at silence gaps), or `rounds + 1` simulated ones (the first
    warms up and is not counted)."""
    if settings.input_file is not None:
        return _phrases(performance_events(settings.input_file), settings.silence_gap_s)
    rng, out, t = random.Random(seed), [], 0.05
    for _ in range(rounds + 1):
        out.append(random_phrase(rng, t))
        t = out[-1][-1].time + 1.1 + settings.silence_gap_s
    return out


def bench_engine(engine: Engine, settings: JamSettings, tempo_bpm: float, rounds: int, seed: int = 0) -> dict:
    """Engine-level benchmark (see module docstring). Returns the latency summary plus append cost."""
    stats, appends, warm = LatencyStats(), LatencyStats(), LatencyStats()
    answer_s = settings.response_bars * settings.beats_per_bar * 60.0 / tempo_bpm
    phrases = _human(settings, rounds, seed)
    offset = 1.0 if settings.input_file is not None else 0.0  # a performance starts at 0: after the prefix
    state = engine.start(0.0, tempo_bpm)
    if settings.input_file is not None:  # warm up on a throwaway stream: the file's own events all count
        _answer(engine, engine.start(0.0, tempo_bpm), 0.5, answer_s, warm)
    for r, phrase in enumerate(phrases):
        counted = stats if r or settings.input_file is not None else warm
        if settings.mode == "call_response":  # the human waits for the answer to end
            offset = max(offset, state.cursor + 0.05 - phrase[0].time)
        last = 0.0
        for batch in _instants([replace(e, time=e.time + offset) for e in phrase]):
            last = batch[-1].time
            if settings.mode == "continuous":
                _accompany(engine, state, batch, settings.lookahead_s, counted)
                continue
            started = time.monotonic()
            engine.append_events(state, batch)
            engine.make_room(state, engine.max_seq_len // C.ANSWER_ROOM_DIVISOR)  # as the session does
            (appends if counted is stats else warm).add_latency(time.monotonic() - started)
        if settings.mode == "call_response":
            _answer(engine, state, max(state.cursor, last) + settings.silence_gap_s, answer_s, counted)
    stats.slide_s = list(state.slide_s)
    out = stats.summary()
    out["append_event_p50_ms"] = appends.summary()["p50_ms"]
    out["append_event_p99_ms"] = appends.summary()["p99_ms"]
    if out["ms_per_token"]:
        out["rtf_at_real_density"] = round(1000.0 / (out["ms_per_token"] * REAL_IDS_PER_S), 2)
    return out


def bench_e2e(bundle: Bundle, settings: JamSettings, rounds: int, seed: int = 0) -> dict:
    """A real session with a MIDI file as the human: `settings.input_file` in `settings.mode`, else a file of
    `rounds` simulated phrases in call-and-response (~3 s a round)."""
    if settings.input_file is not None:
        run = settings.replace(transport="file", output_port=None, record=None, duration_s=None)
        return run_jam(run, bundle=bundle, log=lambda line: None)
    gap = 0.4
    answer_bars = 0.5
    answer_s = answer_bars * settings.beats_per_bar * 60.0 / (settings.tempo_bpm or bundle.tempo_bpm)
    with tempfile.TemporaryDirectory() as tmp:
        human = write_phrases_midi(Path(tmp) / "human.mid", rounds, seed, gap_s=gap + answer_s + 0.6)
        run = settings.replace(
            transport="file",
            input_file=human,
            output_port=None,
            record=None,
            mode="call_response",
            silence_gap_s=gap,
            response_bars=answer_bars,
            duration_s=None,
        )
        return run_jam(run, bundle=bundle, log=lambda line: None)


HEADLINE = ("p50_ms", "p95_ms", "p99_ms", "max_ms", "ms_per_token", "rtf")


def bench_latency(bundle: Bundle, settings: JamSettings, rounds: int = 20, e2e: bool = False) -> dict:
    """Latency p50/p95/p99 and RTF of `bundle` under `settings`, as a JSON-able dict (headline figures first)."""
    tempo = settings.tempo_bpm or bundle.tempo_bpm
    engine = make_engine(bundle, settings)
    result = {
        "mode": settings.mode,
        "backend": bundle.model.describe(),
        "load_s": round(bundle.load_s, 3),
        "input": str(settings.input_file) if settings.input_file else f"simulated, {rounds} rounds",
        "model": model_info(bundle),
        "tempo_bpm": tempo,
        "torch_threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "engine": bench_engine(engine, settings, tempo, rounds, seed=settings.seed or 0),
    }
    if e2e:
        result["e2e"] = bench_e2e(bundle, settings, max(2, rounds // 2), seed=settings.seed or 0)
    headline = result["e2e"] if e2e else result["engine"]
    return {**{key: headline.get(key) for key in HEADLINE}, **result}


def run_benchmark(
    settings: JamSettings, model: str | None = None, size: dict | None = None, rounds: int = 20, e2e: bool = False
) -> dict:
    """`bench_latency` of `model` (a bundle folder or models:/ URI) under `settings`, headless.

    Args:
        settings: sampling, mode, dtype, threads, `input_file` (a performance as the human)...; transport and
            recording are replaced (memory, none).
        model: the bundle to measure; None: a random-weight bundle of `size` made in a temporary folder (the music
            is noise, the cost is real).
        size: hidden, layers, heads, kv_heads, vocab, max_seq_len of the random bundle; missing keys from
            `DEMO_SIZE`.
        rounds: simulated phrases after one warm-up round (without `input_file`).
        e2e: also run a real-time session with a MIDI file as the human.
    """
    settings = settings.replace(transport="memory", record=None)
    if model is not None:
        run = settings.replace(model=model)
        return {"model_ref": model, **bench_latency(prepare(run), run, rounds=rounds, e2e=e2e)}
    s = {**DEMO_SIZE, **(size or {})}
    with tempfile.TemporaryDirectory() as tmp:
        bundle_dir = make_random_bundle(
            Path(tmp) / "bundle", hidden=s["hidden"], layers=s["layers"], heads=s["heads"],
            kv_heads=s.get("kv_heads"), intermediate=s["hidden"] * 8 // 3, bpe_vocab=s["vocab"],
            max_seq_len=s["max_seq_len"],
        )  # fmt: skip
        run = settings.replace(model=str(bundle_dir))
        return {"model_ref": "random", **bench_latency(prepare(run), run, rounds=rounds, e2e=e2e)}
