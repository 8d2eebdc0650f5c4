"""The training step's CPU arithmetic: oneDNN projections, float32 attention and head under bf16 autocast."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from pipeline.core.training import ModelConfig
from pipeline.train import compute
from pipeline.train.compute import Projection, keep_fp32, use_cpu_attention, use_cpu_gemm
from pipeline.train.model import Vocab, build_base

VOCAB = Vocab(size=96, pad_id=0, bos_id=1, eos_id=2)
MODEL = ModelConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64)


def _model(seed: int = 0):
    torch.manual_seed(seed)
    return build_base(MODEL, VOCAB, 32)


def _batch():
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(3, VOCAB.size, (3, 20), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, 12:] = 0  # right padding, as the tokenize stage writes windows
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def _step(model, autocast: bool = False):
    """Logits and every parameter's gradient of one loss.backward()."""
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = model(**_batch())
    out.loss.backward()
    return out.logits.detach().float(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("shape", [(7, 24), (3, 5, 24)])
@pytest.mark.parametrize("bias", [True, False])
def test_projection_equals_linear(shape, bias):
    torch.manual_seed(0)
    ref = nn.Linear(24, 40, bias=bias)
    fast = nn.Linear(24, 40, bias=bias)
    fast.load_state_dict(ref.state_dict())
    assert use_cpu_gemm(fast, "onednn") == 1 and isinstance(fast, Projection)
    x = torch.randn(*shape, requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    ref(x).square().sum().backward()
    fast(x2).square().sum().backward()
    assert torch.allclose(fast(x2), ref(x), atol=1e-5)
    assert torch.allclose(x2.grad, x.grad, atol=1e-4)
    assert torch.allclose(fast.weight.grad, ref.weight.grad, atol=1e-4)
    if bias:
        assert torch.allclose(fast.bias.grad, ref.bias.grad, atol=1e-4)


def test_projection_on_a_non_contiguous_input():
    torch.manual_seed(0)
    layer = nn.Linear(16, 8)
    use_cpu_gemm(layer, "onednn")
    x = torch.randn(16, 6, requires_grad=True)
    out = layer(x.t())  # (6, 16) through a transposed view
    assert torch.allclose(out, torch.nn.functional.linear(x.t(), layer.weight, layer.bias), atol=1e-5)
    out.sum().backward()
    assert torch.allclose(x.grad, layer.weight.sum(0)[:, None].expand(16, 6), atol=1e-5)


def test_model_on_onednn_trains_as_on_mkl(tmp_path):
    ref, fast = _model(), _model()
    changed = use_cpu_gemm(fast, "onednn")
    assert changed == MODEL.num_layers * 7 + 1  # q k v o gate up down per layer, and the (tied) output head
    logits_ref, grads_ref = _step(ref)
    logits, grads = _step(fast)
    assert torch.allclose(logits, logits_ref, atol=1e-5)
    for name, grad in grads_ref.items():
        assert torch.allclose(grads[name], grad, atol=1e-5, rtol=1e-4), name
    assert fast.state_dict().keys() == ref.state_dict().keys()
    fast.save_pretrained(tmp_path)  # the saved model is a plain Llama
    assert "_attn_implementation" not in json.loads((tmp_path / "config.json").read_text())


def test_mkl_leaves_the_model_alone():
    model = _model()
    assert use_cpu_gemm(model, "mkl") == 0
    assert not any(isinstance(m, Projection) for m in model.modules())


def test_auto_takes_the_runner_rule(monkeypatch):
    monkeypatch.setattr(compute, "cpu_gemm", lambda choice: "onednn")
    assert use_cpu_gemm(_model(), "auto") > 0
    monkeypatch.setattr(compute, "cpu_gemm", lambda choice: "mkl")
    assert use_cpu_gemm(_model(), "auto") == 0


def test_subclasses_keep_their_forward():
    class Special(nn.Linear):  # as bitsandbytes' Linear4bit subclasses nn.Linear
        pass

    model = nn.Sequential(nn.Linear(4, 4), Special(4, 4))
    assert use_cpu_gemm(model, "onednn") == 1
    assert type(model[1]) is Special


def _spy_attention(monkeypatch) -> list[torch.dtype]:
    seen: list[torch.dtype] = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(query, key, value, **kwargs):
        out = sdpa(query, key, value, **kwargs)
        seen.append(out.dtype)  # autocast casts the inputs inside the call: its result tells what it computed in
        return out

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    return seen


def test_fp32_attention_under_autocast(monkeypatch):
    seen = _spy_attention(monkeypatch)
    plain, fp32 = _model(), _model()
    use_cpu_attention(fp32, "float32")
    _step(plain, autocast=True)
    assert set(seen) == {torch.bfloat16}  # torch's autocast policy for attention on a CPU
    seen.clear()
    _step(fp32, autocast=True)
    assert set(seen) == {torch.float32}


@pytest.mark.parametrize("kind", ["float32", "matmul"])
def test_cpu_attention_without_autocast_is_sdpa(kind):
    ref, model = _model(), _model()
    use_cpu_attention(model, kind)
    logits_ref, grads_ref = _step(ref)
    logits, grads = _step(model)
    assert torch.equal(logits, logits_ref)  # the same masks and the same kernel
    assert all(torch.equal(grads[n], g) for n, g in grads_ref.items())


def _qkv(batch=2, heads=4, length=9, dim=8, kv_heads=None, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, length, dim, generator=gen)
    k, v = (torch.randn(batch, kv_heads or heads, length, dim, generator=gen) for _ in range(2))
    return q, k, v


def _sdpa(q, k, v, **kwargs):
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, **kwargs).transpose(1, 2)


def test_matmul_attention_is_sdpa_in_float32():
    q, k, v = _qkv()
    causal = compute.matmul_attention(q, k, v, None, 8**-0.5)
    assert causal.shape == (2, 9, 4, 8) and causal.is_contiguous()
    assert torch.allclose(causal, _sdpa(q, k, v, is_causal=True), atol=1e-6)
    mask = torch.ones(2, 1, 9, 9, dtype=torch.bool).tril()
    mask[1, :, :, 6:] = False  # the second row's padding
    assert torch.allclose(compute.matmul_attention(q, k, v, mask, 0.3), _sdpa(q, k, v, attn_mask=mask, scale=0.3),
                          atol=1e-6)  # fmt: skip
    additive = torch.randn(1, 4, 9, 9)
    assert torch.allclose(compute.matmul_attention(q, k, v, additive, 8**-0.5), _sdpa(q, k, v, attn_mask=additive),
                          atol=1e-6)  # fmt: skip


def test_matmul_attention_row_with_nothing_to_attend_is_finite():
    q, k, v = _qkv()
    mask = torch.ones(9, 9, dtype=torch.bool).tril()
    mask[0] = False  # as a left-padded row's first query
    out = compute.matmul_attention(q, k, v, mask, 8**-0.5)
    assert torch.isfinite(out).all()
    assert torch.allclose(out[:, 0], v.mean(2), atol=1e-6)  # uniform over the keys
    assert torch.allclose(out[:, 1:], _sdpa(q, k, v, is_causal=True)[:, 1:], atol=1e-6)


def test_matmul_attention_in_bf16_gradients():
    q, k, v = (t.requires_grad_() for t in _qkv())
    qb, kb, vb = (t.detach().bfloat16().requires_grad_() for t in (q, k, v))
    _sdpa(q, k, v, is_causal=True).square().sum().backward()
    out = compute.matmul_attention(qb, kb, vb, None, 8**-0.5)
    assert out.dtype == torch.bfloat16
    out.float().square().sum().backward()
    for fast, exact in ((qb, q), (kb, k), (vb, v)):
        assert torch.allclose(fast.grad.float(), exact.grad, atol=0.03 * exact.grad.abs().max().item())


@pytest.mark.parametrize("kv_heads", [None, 1])
def test_matmul_attention_under_autocast(monkeypatch, kv_heads):
    seen = _spy_attention(monkeypatch)
    cfg = MODEL.model_copy(update={"num_kv_heads": kv_heads})
    torch.manual_seed(0)
    ref = build_base(cfg, VOCAB, 32)
    torch.manual_seed(0)
    model = build_base(cfg, VOCAB, 32)
    use_cpu_attention(model, "matmul")
    logits_ref, grads_ref = _step(ref)  # float32, torch's kernel
    assert seen == [torch.float32] * cfg.num_layers
    logits, grads = _step(model, autocast=True)
    assert len(seen) == cfg.num_layers  # the autocast step never called SDPA
    assert torch.allclose(logits, logits_ref, atol=0.05 * logits_ref.abs().max().item())
    for name, grad in grads_ref.items():
        assert torch.allclose(grads[name], grad, atol=0.1 * grad.abs().max().item()), name


def test_keep_fp32_head_under_autocast():
    model = _model()
    head = model.get_output_embeddings()
    keep_fp32(head)
    x = torch.randn(5, MODEL.hidden_size)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = head(x)
        plain = torch.nn.functional.linear(x, head.weight)
    assert out.dtype == torch.float32 and plain.dtype == torch.bfloat16
    assert torch.allclose(out, x @ head.weight.T, atol=1e-5)


def test_keep_fp32_of_any_module():
    torch.manual_seed(0)
    inner = nn.Linear(6, 3)
    wrapper = nn.Sequential(inner)  # as peft wraps a tied head: its forward calls the product itself
    keep_fp32(wrapper)
    keep_fp32(wrapper)  # once is enough
    x = torch.randn(4, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = wrapper(x)
    assert out.dtype == torch.float32
    assert torch.allclose(out, torch.nn.functional.linear(x, inner.weight, inner.bias), atol=1e-6)
    assert isinstance(wrapper, nn.Sequential) and wrapper.state_dict().keys() == {"0.weight", "0.bias"}


@pytest.mark.parametrize("precision", ["no", "bf16"])
def test_configure_applies_the_loop_on_a_cpu(precision, monkeypatch):
    from pipeline.core.training import LoopConfig

    monkeypatch.setattr(compute, "cpu_gemm", lambda choice: choice)
    model = _model()
    compute.configure(model, LoopConfig(cpu_gemm="onednn", fp32_head=True), precision, torch.device("cpu"))
    assert all(layer.onednn for layer in model.modules() if isinstance(layer, Projection))
    autocast = precision == "bf16"
    assert model.config._attn_implementation == ("cpu_matmul" if autocast else "sdpa")  # the default: matmul
    assert model.get_output_embeddings().fp32 is autocast
    for kind, name in compute.CPU_ATTENTION.items():
        other = _model()
        compute.configure(other, LoopConfig(cpu_attention=kind, fp32_head=False), precision, torch.device("cpu"))
        assert other.config._attn_implementation == (name if autocast else "sdpa")
    assert not getattr(other.get_output_embeddings(), "fp32", False)


def test_configure_leaves_a_gpu_model_alone():
    from pipeline.core.training import LoopConfig

    model = _model()
    compute.configure(model, LoopConfig(cpu_gemm="onednn"), "bf16", torch.device("cuda"))
    assert not any(isinstance(m, Projection) for m in model.modules())
    assert model.config._attn_implementation == "sdpa"


def test_dropout_masks_like_torch():
    layer = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.25))
    assert compute.use_fast_dropout(layer) == 1 and isinstance(layer[1], compute.Dropout)
    drop = layer[1]
    x = torch.randn(1000, 1000, requires_grad=True)
    torch.manual_seed(3)
    out = drop(x)
    kept = out != 0
    assert abs(kept.float().mean().item() - 0.75) < 0.002  # 1M draws: the standard error is 4e-4
    assert torch.allclose(out[kept], x[kept] / 0.75)
    out.sum().backward()
    assert torch.equal(x.grad, kept.float() / 0.75)
    torch.manual_seed(3)
    assert torch.equal(drop(x), out)  # seeded by torch's generator: a resumed run draws the same masks
    assert not torch.equal(drop(x), out)
    drop.eval()
    assert drop(x) is x or torch.equal(drop(x), x)


def _qlora(tmp_path):
    from pipeline.core.training import FinetuneConfig
    from pipeline.train.model import add_lora, load_base

    if not (tmp_path / "base" / "config.json").exists():
        _model().save_pretrained(tmp_path / "base")
    torch.manual_seed(1)
    fc = FinetuneConfig(lora_dropout=0.0)  # the same adapter output both ways
    return add_lora(load_base(tmp_path / "base", "nf4", True, "float32"), fc)


def _lora_step(model, autocast: bool = False):
    logits, grads = _step(model, autocast)
    return logits, {n: g for n, g in grads.items() if "lora_" in n}


@pytest.mark.parametrize("onednn", [False, True])
def test_4bit_layers_multiply_as_bitsandbytes(tmp_path, onednn):
    ref, model = _qlora(tmp_path), _qlora(tmp_path)
    assert compute.use_cpu_4bit(model, onednn) == MODEL.num_layers * 7
    logits_ref, grads_ref = _lora_step(ref)
    logits, grads = _lora_step(model)
    assert torch.allclose(logits, logits_ref, atol=1e-4)
    assert grads.keys() == grads_ref.keys() and grads
    for name, grad in grads_ref.items():
        assert torch.allclose(grads[name], grad, atol=1e-4, rtol=1e-3), name
    assert model.state_dict().keys() == ref.state_dict().keys()


def test_4bit_layers_under_autocast_multiply_in_bf16(tmp_path):
    ref, model = _qlora(tmp_path), _qlora(tmp_path)
    compute.use_cpu_4bit(model, True)
    layer = next(m for m in model.modules() if isinstance(m, compute._CpuLinear4bit))
    x = torch.randn(5, MODEL.hidden_size)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    assert out.dtype == torch.bfloat16
    exact = layer.__class__.__mro__[2].forward(layer, x)  # bitsandbytes' own, in float32
    assert torch.allclose(out.float(), exact, atol=0.05 * exact.abs().max().item())
    logits_ref, _ = _lora_step(ref, autocast=True)
    logits, grads = _lora_step(model, autocast=True)
    assert torch.allclose(logits, logits_ref, atol=0.05 * logits_ref.abs().max().item())
    assert all(g.abs().sum() > 0 for n, g in grads.items() if "lora_B" in n)  # A's are 0 while B starts at 0


_HEAP_SCRIPT = """
import json, os, resource, torch
from pipeline.train import compute

def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

def touch_and_free(mib=48):  # 48 MiB: above glibc's thresholds, its dynamic rule's too
    block = torch.ones(mib << 20, dtype=torch.uint8)
    del block

start = rss()
touch_and_free()
out = {"default": rss() - start}
with compute.kept_heap(torch.device("cpu")):
    touch_and_free()
    out["kept"] = rss() - start
out["left"] = rss() - start
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(40):
    touch_and_free(8)
out["faulted_per_block"] = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / 40 / 2048
before = rss()
with compute.kept_heap(torch.device("cuda")):  # a GPU's training: glibc left alone
    touch_and_free()
    out["gpu"] = rss() - before
print(json.dumps(out))
"""


@pytest.mark.skipif(compute._glibc() is None, reason="glibc's mallopt")
def test_kept_heap_keeps_freed_memory_until_it_ends():
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[3]
    out = subprocess.run([sys.executable, "-c", _HEAP_SCRIPT], cwd=repo, capture_output=True, text=True, check=True)
    rss = json.loads(out.stdout.strip().splitlines()[-1])  # MiB resident above the start, a fresh process
    assert rss["default"] < 16  # given back at once
    assert rss["kept"] > 40  # kept for the next step
    assert rss["left"] < 16  # trimmed on leaving
    # then as glibc's dynamic rule settles: 8 MiB blocks reuse the heap's pages (0.12-0.2 here; with glibc's start
    # values, which mallopt would leave fixed, every block's 2,048 pages faulted in again in some runs)
    assert rss["faulted_per_block"] < 0.5
    assert rss["gpu"] < 16
