"""Streaming engine: its cached logits equal the transformers model's full re-encode after appends, crops, retracts
and slides; time bookkeeping, answers' grammar, the note-ending rule."""

from __future__ import annotations

import random

import pytest
import torch

from realtime.codec import Decoder, NoteEvent, TokenCodec
from realtime.engine import ChunkContext
from realtime.synthetic import random_phrase

ATOL = 1e-4


@pytest.fixture
def full_logits(tiny_bundle_master):
    """Next-token logits of the transformers model (same bundle, same adapter) encoding `ids` from scratch."""
    from realtime.bundle import load_model

    model = load_model(tiny_bundle_master)

    def logits(ids: list[int]) -> torch.Tensor:
        with torch.inference_mode():
            return model(input_ids=torch.tensor([ids])).logits[0, -1].float()

    return logits


def play_phrase(engine, state, start: float = 0.1, seed: int = 0) -> None:
    for event in random_phrase(random.Random(seed), start):
        engine.append_events(state, [event])  # one event at a time, as they arrive live


def test_streaming_equals_full_reencode(engine, full_logits):
    state = engine.start(0.0, 120.0)
    play_phrase(engine, state)
    engine.append_rest(state, 1.6)
    state, out = engine.generate_chunk(state, ChunkContext(until=3.0, max_tokens=20, allow_eos=False))
    assert out.tokens > 0
    assert len(state.ids) < engine.max_seq_len  # no slide happened: the window is the whole stream
    engine._ensure_logits(state)
    torch.testing.assert_close(torch.from_numpy(state.logits), full_logits(state.ids), atol=ATOL, rtol=0)


def test_crop_takes_back_only_unplayed_output(engine, full_logits):
    state = engine.start(0.0, 120.0)
    play_phrase(engine, state)
    human_len = len(state.ids)
    state, _ = engine.generate_chunk(state, ChunkContext(until=state.cursor + 3.0, max_tokens=30))
    cut_time = state.starts[human_len] + 0.5
    first = engine.crop_unplayed(state, cut_time)
    if first is None:
        pytest.skip("the random model produced nothing after the cut point")
    assert len(state.ids) >= human_len  # human tokens are never taken back
    assert all(s <= cut_time for s in state.starts)
    assert state.serials[-1] < first
    assert state.cache.length == len(state.ids)
    engine._ensure_logits(state)
    torch.testing.assert_close(torch.from_numpy(state.logits), full_logits(state.ids), atol=ATOL, rtol=0)


def test_window_slides_and_reprefills(engine, full_logits):
    state = engine.start(0.0, 120.0)
    for round_ in range(4):
        play_phrase(engine, state, state.cursor + 0.1, seed=round_)
        state, _ = engine.generate_chunk(state, ChunkContext(until=state.cursor + 4.0, max_tokens=40))
        assert len(state.ids) <= engine.max_seq_len
    assert state.slide_s, "the window never slid"
    assert state.cache.length == len(state.ids)
    engine._ensure_logits(state)
    torch.testing.assert_close(torch.from_numpy(state.logits), full_logits(state.ids), atol=ATOL, rtol=0)
    assert state.serials == sorted(set(state.serials))  # serials are never reused


def test_chunk_streams_time_ordered_events(engine):
    state = engine.start(0.0, 120.0)
    play_phrase(engine, state)
    engine.append_rest(state, 1.6)
    seen = []
    ctx = ChunkContext(until=5.6, allow_eos=True, drop_leading_rest=True, on_event=lambda e, s: seen.append((e, s)))
    state, out = engine.generate_chunk(state, ctx)
    assert [e for e, _ in seen] == out.events
    times = [e.time for e in out.events]
    assert times == sorted(times)
    if out.events:
        assert out.events[0].time == pytest.approx(1.6)  # the answer starts at once: leading rest dropped
        assert out.first_event_at is not None
    engine.close_open_notes(state, None)
    assert not state.open_notes


def test_codec_time_grid_and_ranges(prepared):
    codec = TokenCodec(prepared.tokenizer)
    tokens, beats = codec.shift_tokens(13.3)
    assert beats == pytest.approx(13.25)  # 1/8-beat grid
    assert sum(op[1] for t in tokens for op in codec.ops[codec.vocab[t]]) == pytest.approx(13.25)
    assert codec.shift_tokens(0.04) == ([], 0.0)  # under half a grid step: no token
    assert codec.event_tokens(NoteEvent("on", 10, 90)) == []  # below the piano: not representable
    assert codec.event_tokens(NoteEvent("on", 60, 90)) == ["NoteOn_60", "Velocity_87"]  # nearest of 16 bins
    ids = codec.encode(["NoteOn_60", "Velocity_63", "TimeShift_0.4.8", "NoteOff_60"])
    ops = [op for i in ids for op in codec.ops[i]]
    assert ops == [("on", 60), ("vel", 63), ("shift", 0.5), ("off", 60)]


def test_decoder_skips_what_does_not_decode():
    dec = Decoder()
    assert dec.feed((("vel", 80),)) == []  # velocity with no NoteOn
    assert dec.feed((("on", 60), ("shift", 0.5))) == [("shift", 0.5)]  # NoteOn without velocity: dropped
    assert dec.feed((("on", 62),)) == []
    assert dec.feed((("vel", 70), ("off", 62))) == [("note", 62, 70), ("off", 62)]


def test_rest_appended_ahead_can_be_retracted(engine, full_logits):
    state = engine.start(0.0, 120.0)
    play_phrase(engine, state)
    ids, cursor = list(state.ids), state.cursor
    added = engine.append_rest(state, cursor + 0.8)
    assert added > 0 and state.cursor == pytest.approx(cursor + 0.8)
    engine.retract(state, added, cursor)  # the human played on before the silence was complete
    assert state.ids == ids and state.cursor == cursor
    assert state.cache.length == len(ids)
    engine._ensure_logits(state)
    torch.testing.assert_close(torch.from_numpy(state.logits), full_logits(state.ids), atol=ATOL, rtol=0)


@pytest.mark.parametrize("seed", range(5))
def test_answers_open_with_a_complete_note(engine, seed):
    """The first id of an answer opens with a NoteOn and a NoteOn is always followed by its Velocity, so the first
    event comes after one or two ids whatever the model prefers."""
    engine.reseed(seed)
    state = engine.start(0.0, 120.0)
    play_phrase(engine, state, seed=seed)
    engine.append_rest(state, 1.6)
    ctx = ChunkContext(until=3.6, allow_eos=True, drop_leading_rest=True)
    state, out = engine.generate_chunk(state, ctx)
    assert out.events and out.events[0].kind == "on"
    assert out.events[0].time == pytest.approx(1.6)


@pytest.mark.parametrize("seed", range(3))
def test_every_model_note_ends_within_the_limit(engine, seed):
    """The note-ending rule: no model note sounds longer than max_note_beats (a shift past it is banned), except by
    the time shift inside the very id that opened it (a BPE id "NoteOn Velocity TimeShift")."""
    engine.max_note_beats = 1.0
    engine.reseed(seed)
    state = engine.start(0.0, 120.0)
    play_phrase(engine, state, seed=seed)
    state, out = engine.generate_chunk(state, ChunkContext(until=state.cursor + 10.0, max_tokens=80))
    onsets: dict[int, list[float]] = {}
    opening = [ops for ops in engine.codec.ops if ops and ops[0][0] == "on"]
    slack = max(sum(op[1] for op in ops[1:] if op[0] == "shift") for ops in opening)
    for event in out.events:
        if event.kind == "on":
            onsets.setdefault(event.pitch, []).append(event.time)
        elif event.kind == "off":
            held_beats = (event.time - onsets[event.pitch].pop(0)) * 120.0 / 60.0
            assert held_beats <= 1.0 + slack + 1e-6
    for pitch, times in onsets.items():  # still sounding at the chunk's end: within the limit too
        assert all((state.cursor - t) * 2.0 <= 1.0 + slack + 1e-6 for t in times), pitch


@pytest.mark.parametrize("seed", range(3))
def test_no_more_model_notes_sound_than_the_polyphony_limit(engine, seed):
    """The polyphony rule: no note starts while `max_polyphony` model notes sound (an id may strike several: BPE)."""
    engine.max_polyphony = 2
    engine.reseed(seed)
    state = engine.start(0.0, 120.0)
    play_phrase(engine, state, seed=seed)
    state, out = engine.generate_chunk(state, ChunkContext(until=state.cursor + 10.0, max_tokens=120))
    strikes_per_id = max(sum(op[0] == "on" for op in ops) for ops in engine.codec.ops)
    sounding, most = 0, 0
    for event in out.events:
        sounding += {"on": 1, "off": -1}.get(event.kind, 0)
        most = max(most, sounding)
    assert sum(e.kind == "on" for e in out.events) > 2  # it played
    assert most <= 2 + strikes_per_id - 1


def test_prompt_start_keeps_human_notes_open_and_ends_at_now(engine):
    ids = engine.codec.encode([*engine.codec.prefix_tokens, "NoteOn_60", "Velocity_63", "TimeShift_1.0.8"])
    state = engine.start(5.0, 120.0, prompt=ids)
    assert state.cursor == pytest.approx(5.0) and state.ids == ids
    assert not state.open_notes  # the prompt's notes are not the model's
