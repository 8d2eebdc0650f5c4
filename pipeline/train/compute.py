"""How a training step computes on a CPU: float32 projections on oneDNN, attention through bf16 products.

torch's float32 matmul is MKL's, whose AVX-512 kernels run on Intel CPUs only: on an AMD EPYC (Zen 5, 2 threads) the
demo model's training products ran at ~175 GFLOP/s through it and 340-400 through oneDNN's inner product
(`torch.ops.mkldnn._linear_pointwise`, the primitive bf16 autocast already uses; bench/train.py's gemm section). torch
exposes no float32 switch to it (`torch.backends.mkldnn.matmul.fp32_precision` only allows rounding to bf16), so
`Projection` is an `nn.Linear` whose forward and input gradient run there and whose weight gradient stays on MKL
(oneDNN's inner product reads that product's transposed operands through copies that cost what it saves). The sums
are the same to float rounding; the library for a CPU is `realtime.linear.cpu_gemm`'s, as the runner's prefills.

Under bf16 autocast torch runs `scaled_dot_product_attention` in bf16, whose CPU kernel is slower than float32's at
this model's shapes (head_dim 32, causal) and both are slower than batched bf16 products: `matmul_attention`, a
transformers attention function ("cpu_matmul", `cpu_attention: matmul`); "sdpa_fp32" runs torch's kernel in float32.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
from collections.abc import Iterator

import numpy as np
import torch
from torch import nn

from pipeline.core.training import LoopConfig
from realtime.linear import cpu_gemm

log = logging.getLogger(__name__)

# `cpu_attention` -> the name `config._attn_implementation` takes (registered by `use_cpu_attention`)
CPU_ATTENTION = {"float32": "sdpa_fp32", "matmul": "cpu_matmul", "sdpa": "sdpa"}


def _mkldnn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    # (rows, in) @ (out, in).T [+ bias]; `weight` may be a transposed view: oneDNN reads it without a copy
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


def _product(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, onednn: bool) -> torch.Tensor:
    """x @ weight.T + bias over x's last dimension: in float32 on oneDNN when `onednn`, else torch's linear."""
    if not (onednn and x.dtype == torch.float32):
        return torch.nn.functional.linear(x, weight, bias)
    rows = x.reshape(-1, x.shape[-1]).contiguous()  # (batch * seq, in)
    return _mkldnn_linear(rows, weight, bias).view(*x.shape[:-1], weight.shape[0])


class _Projection(torch.autograd.Function):
    """x @ W.T + b with the forward and the input's gradient on oneDNN, the weight's gradient on torch's mm."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return _product(x, weight, bias, onednn=True)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            gx = _product(grad, weight.t(), None, onednn=True)
        g = grad.reshape(-1, grad.shape[-1])  # (batch * seq, out)
        if ctx.needs_input_grad[1]:
            gw = torch.mm(g.t(), x.reshape(-1, x.shape[-1]))  # (out, in)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            gb = g.sum(0)
        return gx, gw, gb


class Projection(nn.Linear):
    """`nn.Linear` that computes float32 CPU products through `_Projection` (`onednn`), and in float32 under autocast
    too (`fp32`); as `nn.Linear` otherwise. Under autocast torch already sends the product to oneDNN, in bf16."""

    onednn: bool = False
    fp32: bool = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fp32 and torch.is_autocast_enabled(x.device.type):
            with torch.autocast(x.device.type, enabled=False):
                return self.forward(x.float())
        float32 = x.dtype == self.weight.dtype == torch.float32
        if self.onednn and float32 and x.device.type == "cpu" and not torch.is_autocast_enabled("cpu"):
            return _Projection.apply(x, self.weight, self.bias)
        return super().forward(x)


def _projection(module: nn.Linear) -> Projection:
    if type(module) is nn.Linear:
        module.__class__ = Projection
    return module


def use_cpu_gemm(model: nn.Module, choice: str) -> int:
    """Send the float32 products of every plain `nn.Linear` of `model` to oneDNN when `cpu_gemm(choice)` picks it.

    Subclasses are left alone (bitsandbytes' 4-bit layers: `use_cpu_4bit`); weights and state dict are untouched.
    Returns the number of layers changed (0 with MKL).
    """
    if cpu_gemm(choice) != "onednn":
        return 0
    layers = [m for m in model.modules() if type(m) in (nn.Linear, Projection)]
    for module in layers:
        _projection(module).onednn = True
    return len(layers)


class _Dequantized(torch.autograd.Function):
    """x @ dequantize(W).T + b for a frozen 4-bit W (bitsandbytes): the product in `x`'s dtype, on oneDNN in float32
    (`onednn`); W is dequantized again for the input's gradient rather than kept, as bitsandbytes does."""

    @staticmethod
    def forward(ctx, x, weight, quant_state, bias, onednn: bool):
        from bitsandbytes.functional import dequantize_4bit

        ctx.weight, ctx.quant_state, ctx.onednn = weight, quant_state, onednn
        w = dequantize_4bit(weight, quant_state).to(x.dtype)  # (out, in)
        b = None if bias is None else bias.to(x.dtype)
        return _product(x, w, b, onednn)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        from bitsandbytes.functional import dequantize_4bit

        w = dequantize_4bit(ctx.weight, ctx.quant_state).to(grad.dtype)
        return _product(grad, w.t(), None, ctx.onednn), None, None, None, None


class _CpuLinear4bit:
    """Mixed into bitsandbytes' `Linear4bit` by `use_cpu_4bit`: its CPU product in the autocast dtype (bf16: oneDNN's
    bf16 kernel) or on oneDNN in float32. bitsandbytes' own CPU path multiplies in float32 through torch's matmul
    even under autocast (its op is opaque to autocast): with MKL on a CPU not Intel's, 21 % of a demo fine-tune step
    went to the 4-bit layers against LoRA on an unquantized base."""

    onednn: bool = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu" or self.weight.requires_grad or (self.bias is not None and self.bias.requires_grad):
            return super().forward(x)
        autocast = torch.is_autocast_enabled("cpu")
        dtype = torch.get_autocast_dtype("cpu") if autocast else (self.compute_dtype or x.dtype)
        with torch.autocast("cpu", enabled=False):
            out = _Dequantized.apply(x.to(dtype), self.weight, self.weight.quant_state, self.bias, self.onednn)
        return out if autocast else out.to(x.dtype)  # bitsandbytes hands back the input's dtype


def use_cpu_4bit(model: nn.Module, onednn: bool) -> int:
    """Every bitsandbytes `Linear4bit` of `model` multiplies as `_CpuLinear4bit` on a CPU; returns how many."""
    try:
        from bitsandbytes.nn import Linear4bit
    except ImportError:
        return 0
    layers = [m for m in model.modules() if isinstance(m, Linear4bit)]
    for module in layers:
        _mix_in(module, _CpuLinear4bit, "Cpu")
        module.onednn = onednn
    return len(layers)


class _Float32:
    """Mixed into a module's class by `keep_fp32`: its forward runs with autocast off, on a float32 input."""

    def forward(self, x: torch.Tensor, *args, **kwargs):
        if not torch.is_autocast_enabled(x.device.type):
            return super().forward(x, *args, **kwargs)
        with torch.autocast(x.device.type, enabled=False):
            return super().forward(x.float(), *args, **kwargs)


def keep_fp32(module: nn.Module) -> None:
    """`module` computes in float32 under autocast too (the output head: bf16 logits round the loss's inputs).

    A plain `nn.Linear` becomes a `Projection` (its float32 product then takes `use_cpu_gemm`'s library); any other
    module (peft's trainable-tokens wrapper of a tied head) gets `_Float32` mixed into its class.
    """
    if type(module) in (nn.Linear, Projection):
        _projection(module).fp32 = True
    else:
        _mix_in(module, _Float32, "Float32")


def _mix_in(module: nn.Module, mixin: type, prefix: str) -> None:
    """`module`'s class becomes a subclass of it with `mixin` first (its forward wraps the class's); once only."""
    if not isinstance(module, mixin):
        cls = type(module)
        module.__class__ = type(f"{prefix}{cls.__name__}", (mixin, cls), {})


class Dropout(nn.Dropout):
    """`nn.Dropout` whose CPU masks come from numpy's PCG64, seeded by one draw of torch's generator per call.

    torch's CPU Bernoulli draw ran one thread at ~6 ns an element here: the fine-tune's 16 LoRA dropouts a step
    (4,096 x 192 inputs) were 19 % of it, ~6x what this costs. The mask keeps an element with probability
    1 - round(p * 2^16) / 2^16 (p to within 8e-6); resuming stays exact, since torch's generator is checkpointed.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0 or x.device.type != "cpu":
            return super().forward(x)
        seed = int(torch.randint(0, 2**63 - 1, (1,)))
        drawn = np.random.default_rng(seed).integers(0, 2**16, x.shape, dtype=np.uint16)
        # a float mask holding 0 or 1 / (1 - p): x * mask and its gradient ran 4x faster than torch.where on the bool
        mask = torch.from_numpy(drawn >= round(self.p * 2**16)).to(x.dtype).mul_(1.0 / (1.0 - self.p))
        return x * mask


def use_fast_dropout(model: nn.Module) -> int:
    """Every plain `nn.Dropout` of `model` (peft's LoRA dropouts) draws its CPU masks as `Dropout`; returns how many."""
    layers = [m for m in model.modules() if type(m) is nn.Dropout]
    for module in layers:
        module.__class__ = Dropout
    return len(layers)


def matmul_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
) -> torch.Tensor:
    """softmax(q k^T * scaling + mask) v through batched products, in the inputs' dtype; (B, H, T, D) -> (B, T, H, D).

    `mask`: None (causal, upper-left aligned as SDPA's `is_causal`), a boolean (T, S) or (B | 1, H | 1, T, S), True
    where a query may attend, or a float one of those shapes, added to the scores. Masked scores take the dtype's
    lowest value, not -inf: a row with nothing to attend to comes out uniform rather than NaN.

    Why not torch's kernel: at head_dim 32 its CPU flash kernel (either dtype) runs its small blocks at a fraction
    of what oneDNN's batched bf16 products reach; these spend the causal half of the scores too and still took about
    half its time here (bench/train.py's attention section). In bf16 the scores are rounded to bf16 before the
    softmax (as Megatron's non-flash path does), which torch's softmax then sums in float32.
    """
    batch, heads, length, dim = query.shape
    keys = key.shape[2]
    if mask is None:
        mask = torch.ones(length, keys, dtype=torch.bool, device=query.device).tril()
    if mask.dtype == torch.bool:
        bias = torch.zeros(mask.shape, dtype=query.dtype, device=query.device)
        bias.masked_fill_(~mask, torch.finfo(query.dtype).min)
    else:
        bias = mask.to(query.dtype)
    if bias.dim() == 2:  # one (T, S) for every head: a stride-0 view, no copy
        bias = bias.expand(batch * heads, length, keys)
    else:
        bias = bias.expand(batch, heads, length, keys).reshape(batch * heads, length, keys)
    q = query.reshape(batch * heads, length, dim)
    k = key.reshape(batch * heads, keys, dim)
    probs = torch.softmax(torch.baddbmm(bias, q, k.transpose(1, 2), alpha=scaling), dim=-1)
    if dropout > 0:
        probs = torch.nn.functional.dropout(probs, dropout)
    out = torch.bmm(probs, value.reshape(batch * heads, keys, value.shape[-1]))
    return out.view(batch, heads, length, -1).transpose(1, 2).contiguous()


def use_cpu_attention(model: nn.Module, kind: str) -> None:
    """How `model` attends on a CPU under autocast (elsewhere, and without autocast, torch's SDPA as "sdpa" does):
    "float32" (torch's SDPA kernel in float32), "matmul" (`matmul_attention` in the autocast dtype) or "sdpa"
    (torch's kernel in the autocast dtype: transformers' own). Registers a transformers attention function."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    if kind == "sdpa":
        model.config._attn_implementation = "sdpa"
        return

    def attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
        if query.device.type != "cpu" or not torch.is_autocast_enabled("cpu"):
            return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, is_causal,
                                          **kwargs)  # fmt: skip
        if kind == "float32":
            with torch.autocast("cpu", enabled=False):
                query, key, value = query.float(), key.float(), value.float()
                return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, is_causal,
                                              **kwargs)  # fmt: skip
        dtype = torch.get_autocast_dtype("cpu")
        groups = getattr(module, "num_key_value_groups", 1)
        with torch.autocast("cpu", enabled=False):
            query, key, value = query.to(dtype), repeat_kv(key.to(dtype), groups), repeat_kv(value.to(dtype), groups)
            causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
            if attention_mask is None and not (causal and query.shape[2] > 1):
                attention_mask = torch.ones(query.shape[2], key.shape[2], dtype=torch.bool, device=query.device)
            elif attention_mask is None:
                key, value = key[:, :, : query.shape[2]], value[:, :, : query.shape[2]]  # as SDPA's is_causal
            scale = query.shape[-1] ** -0.5 if scaling is None else scaling
            return matmul_attention(query, key, value, attention_mask, scale, dropout), None

    name = CPU_ATTENTION[kind]
    AttentionInterface.register(name, attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(name, sdpa_mask)  # the masks "sdpa" gets, not none
    model.config._attn_implementation = name


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
# Where glibc's dynamic rule leaves the thresholds in a process that has freed large blocks (the mmap threshold rises
# to at most 32 MiB, the trim threshold to twice it): setting them by mallopt turns that rule off for good, so
# restoring the start values (128 KiB) would leave every later allocation above them mapped afresh.
_GLIBC_SETTLED = (32 << 20, 64 << 20)


def _glibc():
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None)
        if libc.gnu_get_libc_version and libc.mallopt and libc.malloc_trim:
            return libc
    return None


@contextlib.contextmanager
def kept_heap(device: torch.device, keep: int = 1 << 30) -> Iterator[None]:
    """Within it, glibc keeps freed memory for the next training step rather than returning it to the system.

    torch's CPU allocator caches nothing: a step's activations come from malloc, which maps allocations above its
    mmap threshold (128 KiB, raised to at most 32 MiB as such chunks are freed) afresh and gives the top of its heap
    back past the trim threshold, so every step faulted its pages in again (one attention layer's forward and
    backward at the demo's shapes, with 12.6 MB of scores, took 2x as long that way in bench/train.py's attention
    section). Both thresholds go to `keep` bytes, so the
    heap stays at the steps' peak; on leaving they go to `_GLIBC_SETTLED` and the heap is trimmed. Only on a CPU
    with glibc (what jemalloc or tcmalloc preloaded would do otherwise).
    """
    libc = _glibc() if device.type == "cpu" else None
    if libc is None:
        yield
        return
    libc.mallopt(_M_MMAP_THRESHOLD, keep)
    libc.mallopt(_M_TRIM_THRESHOLD, keep)
    try:
        yield
    finally:
        libc.mallopt(_M_MMAP_THRESHOLD, _GLIBC_SETTLED[0])
        libc.mallopt(_M_TRIM_THRESHOLD, _GLIBC_SETTLED[1])
        libc.malloc_trim(0)


def configure(model: nn.Module, loop: LoopConfig, precision: str, device: torch.device) -> None:
    """Apply `loop`'s arithmetic to a model built for training on `device` with autocast `precision` (resolved).

    All of it is for a CPU: on a GPU float32 products would cost an order of magnitude more than bf16 ones, so
    attention and head stay in the autocast dtype there.
    """
    if device.type != "cpu":
        return
    onednn = cpu_gemm(loop.cpu_gemm) == "onednn"
    if onednn:
        use_cpu_gemm(model, "onednn")
    use_cpu_4bit(model, onednn)
    use_fast_dropout(model)
    autocast = precision in ("bf16", "fp16")
    if autocast:
        use_cpu_attention(model, loop.cpu_attention)
    if autocast and loop.fp32_head:
        keep_fp32(model.get_output_embeddings())
    dtype = {"bf16": "bfloat16", "fp16": "float16"}.get(precision, "float32")
    attention = {"float32": "float32", "matmul": f"{dtype} products"}.get(loop.cpu_attention, dtype)
    attention = attention if autocast else dtype
    log.info("products %s (float32 ones on %s); attention in %s; output head in %s", dtype,
             "oneDNN" if onednn else "torch's default", attention, "float32" if loop.fp32_head else dtype)  # fmt: skip
