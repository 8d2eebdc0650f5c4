"""Headless latency benchmark on simulated input (`jam bench latency`, bench/latency.py).

Engine level (default, seconds): the same calls the session makes, back to back on a virtual timeline. Each round
the simulated human plays an 8-note phrase, appended event by event as it would arrive live; then
- call_response: the phrase ends; latency = append the rest + sample until the first note is decoded;
- continuous: each human event takes back the plan, is folded in, and `lookahead_s` is re-planned; latency = from
  the event to the first planned event.
End to end (`e2e=True`, real time): a whole `JamSession` in call-and-response with a MIDI file as the human;
latency = from the phrase's silence-gap deadline to the first note actually sent (threads and scheduler included).
"""

from __future__ import annotations

import platform
import random
import tempfile
import time
from pathlib import Path

import torch

from realtime import constants as C
from realtime.bundle import Bundle
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


def _accompany(engine: Engine, state: StreamState, event, lookahead: float, stats: LatencyStats) -> None:
    """One continuous-mode fold-in of a human event at its (virtual) time."""
    triggered = time.monotonic()
    engine.crop_unplayed(state, event.time)
    engine.append_events(state, [event])
    state.cursor = max(state.cursor, event.time)
    state, res = engine.generate_chunk(state, ChunkContext(until=event.time + lookahead, max_tokens=1024))
    stats.add_chunk(res.music_s, res.compute_s, res.tokens)
    if res.first_event_at is not None:
        stats.add_latency(res.first_event_at - triggered)


def bench_engine(engine: Engine, settings: JamSettings, tempo_bpm: float, rounds: int, seed: int = 0) -> dict:
    """Engine-level benchmark (see module docstring). Returns the latency summary plus append cost."""
    rng, stats, appends = random.Random(seed), LatencyStats(), LatencyStats()
    answer_s = settings.response_bars * settings.beats_per_bar * 60.0 / tempo_bpm
    state = engine.start(0.0, tempo_bpm)
    t = 0.0
    for r in range(rounds + 1):  # round 0 warms up and is not counted
        counted = stats if r else LatencyStats()
        for event in random_phrase(rng, t + 0.05):
            if settings.mode == "continuous":
                _accompany(engine, state, event, settings.lookahead_s, counted)
                continue
            started = time.monotonic()
            engine.append_events(state, [event])
            engine.make_room(state, engine.max_seq_len // C.ANSWER_ROOM_DIVISOR)  # as the session does
            (appends if r else LatencyStats()).add_latency(time.monotonic() - started)
        t = max(state.cursor, t + 1.1) + settings.silence_gap_s
        if settings.mode == "call_response":
            t = _answer(engine, state, t, answer_s, counted)
    stats.slide_s = list(state.slide_s)
    out = stats.summary()
    out["append_event_p50_ms"] = appends.summary()["p50_ms"]
    out["append_event_p99_ms"] = appends.summary()["p99_ms"]
    if out["ms_per_token"]:
        out["rtf_at_real_density"] = round(1000.0 / (out["ms_per_token"] * REAL_IDS_PER_S), 2)
    return out


def bench_e2e(bundle: Bundle, settings: JamSettings, rounds: int, seed: int = 0) -> dict:
    """A real call-and-response session with a file of `rounds` phrases as the human (takes ~3 s a round)."""
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


def bench_latency(bundle: Bundle, settings: JamSettings, rounds: int = 20, e2e: bool = False) -> dict:
    """Latency p50/p95/p99 and RTF of `bundle` under `settings` on simulated input, as a JSON-able dict."""
    tempo = settings.tempo_bpm or bundle.tempo_bpm
    engine = make_engine(bundle, settings)
    result = {
        "model": model_info(bundle),
        "mode": settings.mode,
        "rounds": rounds,
        "tempo_bpm": tempo,
        "torch_threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "engine": bench_engine(engine, settings, tempo, rounds, seed=settings.seed or 0),
    }
    if e2e:
        result["e2e"] = bench_e2e(bundle, settings, max(2, rounds // 2), seed=settings.seed or 0)
    return result


def run_benchmark(
    settings: JamSettings, model: str | None = None, size: dict | None = None, rounds: int = 20, e2e: bool = False
) -> dict:
    """`bench_latency` of `model` (a bundle folder or models:/ URI) under `settings`, headless.

    Args:
        settings: sampling, mode, dtype, threads ...; transport and recording are replaced (memory, none).
        model: the bundle to measure; None: a random-weight bundle of `size` made in a temporary folder (the music
            is noise, the cost is real).
        size: hidden, layers, heads, vocab, max_seq_len of the random bundle; missing keys from `DEMO_SIZE`.
        rounds: simulated phrases after one warm-up round.
        e2e: also run a real-time session with a MIDI file as the human.
    """
    settings = settings.replace(transport="memory", record=None, input_file=None)
    if model is not None:
        run = settings.replace(model=model)
        return bench_latency(prepare(run), run, rounds=rounds, e2e=e2e)
    s = {**DEMO_SIZE, **(size or {})}
    with tempfile.TemporaryDirectory() as tmp:
        bundle_dir = make_random_bundle(
            Path(tmp) / "bundle", hidden=s["hidden"], layers=s["layers"], heads=s["heads"],
            intermediate=s["hidden"] * 8 // 3, bpe_vocab=s["vocab"], max_seq_len=s["max_seq_len"],
        )  # fmt: skip
        run = settings.replace(model=str(bundle_dir))
        return bench_latency(prepare(run), run, rounds=rounds, e2e=e2e)
