"""Evaluation's continuations: a fixed length of playing through the runner's engine, EOS never sampled."""

from __future__ import annotations

import pytest

from pipeline.core.config import Config
from pipeline.evaluate import features as F
from pipeline.evaluate import samples as S
from realtime.bundle_format import read_bundle, special_ids
from tests.realtime.conftest import TINY, build_tiny_bundle


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(engine, tokenizer) over a tiny random bundle whose context window is TINY["max_seq_len"] ids."""
    import torch

    from realtime.bundle import load_model
    from realtime.bundle_format import load_tokenizer

    torch.set_num_threads(1)
    bundle = build_tiny_bundle(tmp_path_factory.mktemp("bundle") / "tiny")
    meta = read_bundle(bundle)
    tok = load_tokenizer(bundle / meta["tokenizer"])
    return S.make_engine(load_model(bundle), tok, Config(), meta, TINY["max_seq_len"]), tok


def _unended(problems: list[str]) -> list[str]:
    """The problems about note ends (a random model may also leave the piano's range, which is not at issue)."""
    return [p for p in problems if "hung" in p or "duration" in p]


def _prompt(tok) -> list[int]:
    return [special_ids(tok)["bos_id"]]


def test_a_continuation_plays_the_beats_asked_past_the_context_window_without_eos(tiny):
    engine, tok = tiny
    beats, cap = 64.0, 4000
    ids = S.continue_prompt(engine, _prompt(tok), seed=3, tempo_bpm=120.0, max_tokens=cap, beats=beats)
    assert special_ids(tok)["eos_id"] not in ids
    assert TINY["max_seq_len"] < len(ids) < cap  # the window slid, and time (not the cap) ended it
    score, problems = F.check_sample(tok, ids, max_open_beats=beats)
    assert score is not None and not _unended(problems), problems  # every note ended
    notes = F.notes_from_score(score)
    longest_id = float(engine.grammar.shift_beats.max())  # the id that reaches `beats` may step past it
    assert beats / 2 < max(n.end for n in notes) <= beats + longest_id + 1e-6


def test_the_id_cap_cuts_the_same_stream_and_still_ends_every_note(tiny):
    engine, tok = tiny
    short = S.continue_prompt(engine, _prompt(tok), seed=3, tempo_bpm=120.0, max_tokens=12)
    longer = S.continue_prompt(engine, _prompt(tok), seed=3, tempo_bpm=120.0, max_tokens=40)
    assert short[:12] == longer[:12]  # same seed, same ids; the cap only stops the stream early
    score, problems = F.check_sample(tok, short, max_open_beats=64.0)
    assert score is not None and not _unended(problems), problems  # the closing NoteOffs end every note


def _pool_cfg(workers: int, threads: int = 1) -> Config:
    return Config.model_validate({"project": {"workers": workers}, "realtime": {"threads": threads}})


def test_the_pool_samples_the_ids_inline_sampling_does_in_the_same_order(tiny):
    import numpy as np

    engine, tok = tiny
    bos = special_ids(tok)["bos_id"]
    prompts = np.asarray([[bos], [bos], [bos]])  # the same prompt: only the seed tells samples apart
    args = (prompts, [0, 1], 120.0, 60, 16.0)
    with S.ContinuationPool(_pool_cfg(1)) as inline, S.ContinuationPool(_pool_cfg(2)) as pool:
        expected = inline.sample(engine, *args)
        assert pool.sample(engine, *args) == expected
        assert pool.sample(engine, *args) == expected  # the processes are reused: nothing carried between models
        assert pool._pool is not None
    assert len(expected) == 6 and len({tuple(ids) for ids in expected}) == 6  # seed * 1000 + i: every one differs
    assert expected[4] == S.continue_prompt(engine, [bos], 1001, 120.0, 60, 16.0)  # seed-major order


def test_generation_runs_at_the_runners_thread_count_and_gives_the_callers_back(tiny, monkeypatch):
    import numpy as np
    import torch

    engine, _ = tiny
    seen = []

    def failing(*args):
        seen.append(torch.get_num_threads())
        raise RuntimeError("a failed generation still gives the threads back")

    monkeypatch.setattr(S, "_continue_all", failing)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        with pytest.raises(RuntimeError):
            S.ContinuationPool(_pool_cfg(1, threads=1)).sample(engine, np.asarray([[1]]), [0], 120.0, 8, 4.0)
        assert seen == [1] and torch.get_num_threads() == 2
        with pytest.raises(RuntimeError):  # 0: the caller's count
            S.ContinuationPool(_pool_cfg(1, threads=0)).sample(engine, np.asarray([[1]]), [0], 120.0, 8, 4.0)
        assert seen == [1, 2] and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_a_failed_sample_raises_and_the_next_model_gets_fresh_processes(tiny):
    import numpy as np

    engine, tok = tiny
    bos = special_ids(tok)["bos_id"]
    with S.ContinuationPool(_pool_cfg(2)) as pool:
        with pytest.raises(IndexError):  # an id past the vocabulary fails inside a worker
            pool.sample(engine, np.asarray([[bos, 10**6], [bos, 10**6]]), [0], 120.0, 8, 4.0)
        assert pool._pool is None
        assert len(pool.sample(engine, np.asarray([[bos], [bos]]), [0], 120.0, 8, 4.0)) == 2
