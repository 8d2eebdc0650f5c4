"""The runner's forward computes the transformers model's logits: prefill, one id at a time (the compiled step and
the torch ops), after crops and re-prefills, with grouped-query attention, another RoPE theta, separate or tied
output heads, and merged adapters."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from realtime import linear
from realtime.linear import cpu_gemm
from realtime.llama import LeanLlama, UnsupportedModel

ATOL = 1e-4
VOCAB = 300


def reference(ids: list[int], model) -> torch.Tensor:
    """(len(ids), vocab) logits of transformers' forward, from scratch (no cache)."""
    with torch.inference_mode():
        return model(input_ids=torch.tensor([ids])).logits[0].float()


def make_model(seed: int = 0, **arch) -> LlamaForCausalLM:
    """A random LlamaForCausalLM with non-trivial norm weights (ones would hide a fold that forgets them)."""
    torch.manual_seed(seed)
    size = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 96}
    cfg = LlamaConfig(vocab_size=VOCAB, max_position_embeddings=64, **{**size, **arch})
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return model


SHAPES = {
    "demo-like": {},
    "gqa": {"num_key_value_heads": 2},  # params-gpu.yaml: 8 heads over 4 kv heads
    "mqa-theta-untied": {"num_key_value_heads": 1, "rope_theta": 500.0, "tie_word_embeddings": False},
    "head-dim": {"head_dim": 8},  # head_dim != hidden / heads
}


@pytest.mark.parametrize("gemm", ["mkl", "onednn"])
@pytest.mark.parametrize("decode", ["compiled", "torch"])
@pytest.mark.parametrize("arch", SHAPES.values(), ids=SHAPES.keys())
def test_prefill_and_steps_equal_transformers(arch, decode, gemm):
    model = make_model(**arch)
    lean = LeanLlama.from_module(model, decode=decode, gemm=gemm)
    assert lean.describe().startswith("lean-numba" if decode == "compiled" else "lean-torch")
    assert lean.describe().endswith(" onednn") == (gemm == "onednn")
    ids = torch.randint(3, VOCAB, (40,), generator=torch.Generator().manual_seed(1)).tolist()
    ref = reference(ids, model)
    cache = lean.new_cache()
    torch.testing.assert_close(lean.forward(ids, cache, keep=len(ids)), ref, atol=ATOL, rtol=0)
    assert cache.length == len(ids)
    cache = lean.new_cache()
    first = lean.forward(ids[:10], cache, keep=10)  # a prefill, one id at a time, a few (compiled: one by one), more
    steps = [lean.forward([i], cache) for i in ids[10:25]]
    steps += [lean.forward(ids[25:30], cache, keep=5), lean.forward(ids[30:], cache, keep=10)]
    torch.testing.assert_close(torch.cat([first, *steps]), ref, atol=ATOL, rtol=0)


@pytest.mark.parametrize("gemm", ["mkl", "onednn"])
@pytest.mark.parametrize("decode", ["compiled", "torch"])
def test_crop_and_reprefill_equal_transformers(decode, gemm):
    """What the engine does to a window: take back unplayed ids, rewind, restart the window at position 0."""
    model = make_model(num_key_value_heads=2)
    lean = LeanLlama.from_module(model, decode=decode, gemm=gemm)
    ids = torch.randint(3, VOCAB, (60,), generator=torch.Generator().manual_seed(2)).tolist()
    cache = lean.new_cache()
    lean.forward(ids[:30], cache)
    cache.crop(12)  # crop_unplayed / retract
    got = lean.forward(ids[40:45], cache, keep=5)  # other ids where the cropped ones were
    torch.testing.assert_close(got, reference(ids[:18] + ids[40:45], model)[-5:], atol=ATOL, rtol=0)
    cache.crop(3)  # one id at a time where those were: the step writes over the cropped positions
    steps = torch.cat([lean.forward([i], cache) for i in ids[50:54]])
    torch.testing.assert_close(steps, reference(ids[:18] + ids[40:42] + ids[50:54], model)[-4:], atol=ATOL, rtol=0)
    cache.length = 0  # a slide: the kept half re-prefilled from position 0
    window = ids[30:60]
    lean.forward(window[:-1], cache)
    torch.testing.assert_close(lean.forward(window[-1:], cache)[0], reference(window, model)[-1], atol=ATOL, rtol=0)


def test_cache_bounds_and_unsupported_configs():
    lean = LeanLlama.from_module(make_model())
    cache = lean.new_cache(8)
    lean.forward(list(range(3, 11)), cache)
    with pytest.raises(ValueError, match="need 1 to 0"):
        lean.forward([3], cache)
    with pytest.raises(ValueError, match="need 1 to"):
        lean.forward([], lean.new_cache())
    cfg = make_model().config.to_dict()
    for change in ({"attention_bias": True}, {"hidden_act": "gelu"}, {"rope_parameters": {"rope_type": "llama3"}}):
        with pytest.raises(UnsupportedModel):
            LeanLlama.from_state_dict({**cfg, **change}, make_model().state_dict())
    state = make_model().state_dict()
    with pytest.raises(ValueError, match="decode='compiled' needs float32"):
        LeanLlama.from_state_dict(cfg, state, dtype=torch.bfloat16, decode="compiled")
    assert LeanLlama.from_state_dict(cfg, state, dtype=torch.bfloat16).describe().startswith("lean-torch")
    assert LeanLlama.from_module(make_model(), quantization="dynamic_int8").describe().startswith("lean-torch")


def test_pickled_model_keeps_its_logits_and_aligned_shared_arrays():
    """Evaluation sends engines to processes: the copy's compiled step runs over 64-byte aligned arrays that its torch
    tensors are views of (one copy of the weights), and computes the same logits."""
    model = make_model(num_key_value_heads=2)
    lean = LeanLlama.from_module(model)
    copy = pickle.loads(pickle.dumps(lean))
    arrays = [a for a in copy._step.arrays if isinstance(a, np.ndarray) and a.ndim]
    assert len(arrays) == 8 and all(a.ctypes.data % 64 == 0 for a in arrays)
    assert copy.layers[1].qkv.t.data_ptr() == arrays[3][1].ctypes.data  # qkv stack (layers, in, out), layer 1
    assert copy.head.t.data_ptr() == arrays[-1].ctypes.data and copy.embed.data_ptr() == arrays[0].ctypes.data
    ids = torch.randint(3, VOCAB, (20,), generator=torch.Generator().manual_seed(4)).tolist()
    for m in (lean, copy):
        cache = m.new_cache()
        got = torch.cat([m.forward(ids[:12], cache, keep=12), *(m.forward([i], cache) for i in ids[12:])])
        torch.testing.assert_close(got, reference(ids, model), atol=ATOL, rtol=0)


def test_gemm_follows_the_cpu_vendor(tmp_path, monkeypatch):
    """MKL's fast kernels are Intel-only: auto takes oneDNN on other vendors' CPUs, MKL on Intel's and when unknown."""
    info = tmp_path / "cpuinfo"
    monkeypatch.setattr(linear, "CPUINFO", info)
    assert cpu_gemm() == "mkl"  # no /proc/cpuinfo
    info.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\nflags\t\t: avx2 avx512f\n")
    assert cpu_gemm() == "onednn" and cpu_gemm("mkl") == "mkl"
    info.write_text("processor\t: 0\nvendor_id\t: GenuineIntel\n")
    assert cpu_gemm() == "mkl" and cpu_gemm("onednn") == "onednn"
    with pytest.raises(ValueError, match="gemm 'blas'"):
        cpu_gemm("blas")
    state, cfg = make_model().state_dict(), make_model().config.to_dict()
    assert LeanLlama.from_state_dict(cfg, state, dtype=torch.bfloat16, gemm="onednn").gemm == "torch"


def test_int8_and_bfloat16_stay_close():
    """Not exact (opt-in settings), but the same model: the most likely next id mostly agrees."""
    model = make_model()
    ids = torch.randint(3, VOCAB, (30,), generator=torch.Generator().manual_seed(3)).tolist()
    ref = reference(ids, model)
    for lean in (
        LeanLlama.from_module(model, quantization="dynamic_int8"),
        LeanLlama.from_state_dict(model.config.to_dict(), model.state_dict(), dtype=torch.bfloat16),
    ):
        got = lean.forward(ids, lean.new_cache(), keep=len(ids))
        assert got.dtype == torch.float32 and torch.isfinite(got).all()
        assert (got.argmax(-1) == ref.argmax(-1)).float().mean() > 0.8
        assert (got - ref).abs().max() < 0.2 * ref.abs().max()
