"""The one sampler: filters that keep what transformers' warpers keep, a draw with those odds, and the grammar's masks
and probability moves."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from realtime import kernels
from realtime.sampling import GrammarProcessor, Sampling, sample_token

# ids: 0 PAD, 1 BOS, 2 EOS, 3 NoteOn_60, 4 Velocity_80, 5 TimeShift, 6 NoteOff_60, 7 NoteOff_62 + TimeShift
OPS = [(), (), (("eos",),), (("on", 60),), (("vel", 80),), (("shift", 0.5),), (("off", 60),)]
OPS.append((("off", 62), ("shift", 1.0)))


def grammar(model_vocab: int = 9) -> GrammarProcessor:
    return GrammarProcessor(OPS, pad_id=0, bos_id=1, eos_id=2, model_vocab=model_vocab)


def allowed(g: GrammarProcessor) -> set[int]:
    return {i for i, banned in enumerate(g.banned.tolist()) if not banned}


def probabilities(scores: np.ndarray, banned: np.ndarray, sampling: Sampling) -> np.ndarray:
    """(n,) the odds `draw` samples with."""
    ids, weights = kernels.filtered(scores, banned, sampling.temperature, sampling.top_k, sampling.top_p)
    out = np.zeros(len(scores))
    out[ids] = weights / weights.sum()
    return out


def test_sampling_filters_and_draw():
    logits = np.array([0.0, 3.0, 1.0, 2.9, -1.0], dtype=np.float32)
    none = np.zeros(5, dtype=bool)
    rng = np.random.default_rng(0)

    def draws(sampling: Sampling, n: int, banned=none) -> list[int]:
        return [
            int(kernels.draw(logits, banned, sampling.temperature, sampling.top_k, sampling.top_p, rng.random()))
            for _ in range(n)
        ]

    assert set(draws(Sampling(top_k=1), 20)) == {1}
    assert set(draws(Sampling(top_p=0.01), 20)) == {1}
    assert set(draws(Sampling(top_k=2, temperature=5.0), 200)) == {1, 3}
    banned = np.array([True, True, False, False, False])
    assert set(draws(Sampling(temperature=3.0), 200, banned)) == {2, 3, 4}
    # the draw's frequencies are its odds (4,000 draws: within 0.03 of each)
    sampling = Sampling(temperature=1.5, top_p=1.0)
    counts = np.bincount(draws(sampling, 4000), minlength=5) / 4000
    assert np.abs(counts - probabilities(logits, none, sampling)).max() < 0.03
    grammar = GrammarProcessor([(("on", 1),)] * 5, pad_id=0, bos_id=1, eos_id=2, model_vocab=5)
    grammar.prepare(pending_velocity=False, leading=False, allow_eos=True)
    picks = {sample_token(torch.from_numpy(logits), grammar, Sampling(temperature=3.0), rng) for _ in range(200)}
    assert picks == {2, 3, 4}  # PAD and BOS are never sampled


@pytest.mark.parametrize(
    "sampling", [Sampling(0.7, 0.9, 0), Sampling(1.3, 1.0, 5), Sampling(1.0, 0.5, 40), Sampling(1.0, 0.95, 0)]
)
def test_filters_keep_what_transformers_keeps(sampling):
    """The runner does not import transformers; its filters keep the ids transformers' warpers keep, with the
    probabilities of transformers' softmax, banned ids (here -inf for transformers) included."""
    from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    theirs = [TemperatureLogitsWarper(sampling.temperature)] if sampling.temperature != 1.0 else []
    theirs += [TopKLogitsWarper(sampling.top_k)] if sampling.top_k else []
    theirs += [TopPLogitsWarper(sampling.top_p)] if sampling.top_p < 1.0 else []
    for seed in range(10):  # spread 3: flat-ish steps; 8: a trained model's peaked ones (top-p sorts few ids)
        gen = torch.Generator().manual_seed(seed)
        x = torch.randn(1, 300, generator=gen) * (3 if seed % 2 else 8)
        banned = torch.rand(300, generator=gen) < 0.3
        y = x.masked_fill(banned, -float("inf"))
        for warper in theirs:
            y = warper(None, y)
        ours = probabilities(x[0].numpy(), banned.numpy(), sampling)
        assert np.array_equal(ours > 0, torch.isfinite(y[0]).numpy())
        assert 0 < (ours > 0).sum() < (~banned).sum()  # the filters did filter
        np.testing.assert_allclose(ours, torch.softmax(y[0], -1).numpy(), atol=1e-6)


def test_grammar_masks():
    g = grammar()
    g.prepare(pending_velocity=False, leading=False, allow_eos=False)
    # no PAD/BOS/EOS, nor the padded embedding row 8; no stray Velocity, no NoteOff while no model note sounds
    assert allowed(g) == {3, 5}
    g.prepare(pending_velocity=False, leading=False, allow_eos=True)
    assert allowed(g) == {2, 3, 5}
    g.prepare(pending_velocity=True, leading=False, allow_eos=True)
    assert allowed(g) == {4}  # a NoteOn is followed by its Velocity
    g.prepare(pending_velocity=False, leading=True, allow_eos=True)
    assert allowed(g) == {3}  # an answer opens with a NoteOn


def test_only_sounding_notes_end_and_a_held_key_is_not_struck_again():
    g = grammar()
    g.prepare(pending_velocity=False, leading=False, allow_eos=False, sounding=[62])
    assert allowed(g) == {3, 5, 7}  # NoteOff_62 (id 7) now ends something; NoteOff_60 still does not
    g.prepare(pending_velocity=False, leading=False, allow_eos=False, sounding=[60])
    assert allowed(g) == {5, 6}  # 60 is held: its NoteOff may come, its NoteOn may not (one key sounds once)


def test_overdue_note_forces_its_note_off():
    g = grammar()
    g.prepare(pending_velocity=False, leading=False, allow_eos=True, overdue=[60])
    assert allowed(g) == {6}
    g.prepare(pending_velocity=False, leading=False, allow_eos=True, overdue=[60, 62])
    assert allowed(g) == {6, 7}
    g.prepare(pending_velocity=False, leading=False, allow_eos=True, overdue=[99])  # no NoteOff id: no forcing
    assert allowed(g) == {2, 3, 5}
    g.prepare(pending_velocity=True, leading=False, allow_eos=True, overdue=[60])  # the Velocity comes first
    assert allowed(g) == {4}


def test_no_note_ends_at_its_onset():
    ops = [*OPS, (("on", 64), ("vel", 80), ("off", 64)), (("on", 64), ("vel", 80), ("shift", 0.5), ("off", 64))]
    g = GrammarProcessor(ops, pad_id=0, bos_id=1, eos_id=2, model_vocab=len(ops))
    g.prepare(pending_velocity=False, leading=False, allow_eos=False, just_started=[60], sounding=[60, 62])
    assert allowed(g) == {5, 7, 9}  # NoteOff_60 right after its NoteOn, and the id 8 holding an empty note


def test_a_note_off_of_a_silent_pitch_gives_its_probability_to_the_sounding_notes_offs():
    """The chance that some note ends is the model's: only *which* note ends is corrected."""
    g = grammar()
    logits = torch.tensor([[0.0, 0.0, 0.0, 1.0, 0.0, 0.5, 0.2, 1.5, 0.0]])
    g.prepare(pending_velocity=False, leading=False, allow_eos=False, sounding=[62])
    probs = torch.from_numpy(probabilities(g.moved(logits[0].numpy()), g.banned, Sampling(top_p=1.0))).float()
    raw = torch.softmax(logits[0, [3, 5, 6, 7]], dim=-1)  # NoteOn_60, TimeShift, NoteOff_60, NoteOff_62
    assert torch.allclose(probs[[3, 5, 7]], torch.stack([raw[0], raw[1], raw[3] + raw[2]]))
    assert probs[6] == 0  # NoteOff_60 ends nothing
    g.prepare(pending_velocity=False, leading=False, allow_eos=False)  # nothing sounds: nothing to give it to
    probs = torch.from_numpy(probabilities(g.moved(logits[0].numpy()), g.banned, Sampling(top_p=1.0))).float()
    assert torch.allclose(probs[[3, 5]], torch.softmax(logits[0, [3, 5]], dim=-1))


def test_striking_a_held_key_again_gives_its_probability_to_that_keys_note_off():
    """A model that wants to play a held pitch again wants it released first (a key sounds once)."""
    g = grammar()
    logits = torch.tensor([[0.0, 0.0, 0.0, 1.0, 0.0, 0.5, 0.2, 1.5, 0.0]])
    g.prepare(pending_velocity=False, leading=False, allow_eos=False, sounding=[60, 62])
    probs = torch.from_numpy(probabilities(g.moved(logits[0].numpy()), g.banned, Sampling(top_p=1.0))).float()
    raw = torch.softmax(logits[0, [3, 5, 6, 7]], dim=-1)  # NoteOn_60 (banned: 60 is held), TimeShift, the NoteOffs
    assert probs[3] == 0
    assert torch.allclose(probs[[5, 6, 7]], torch.stack([raw[1], raw[2] + raw[0], raw[3]]))


def test_a_drum_hit_is_never_sampled():
    """miditok's MIDILike vocabulary holds DrumOn/DrumOff tokens: the piano partner cannot sound them, and
    evaluation's decoder would count them as (zero-length) notes."""
    from realtime.codec import _parse

    assert _parse("DrumOn_36") == ("drum", 36)
    ops = [*OPS, (("drum", 36),), (("drum", 36), ("shift", 0.5))]
    g = GrammarProcessor(ops, pad_id=0, bos_id=1, eos_id=2, model_vocab=len(ops))
    for leading in (False, True):
        g.prepare(pending_velocity=False, leading=leading, allow_eos=True, sounding=[60])
        assert not allowed(g) & {8, 9}
