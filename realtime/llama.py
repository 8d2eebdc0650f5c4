"""LlamaForCausalLM's inference math as a plain torch forward over merged weights, with a preallocated KV cache.

What the jam runner and evaluation's sampler run: the weights a bundle's transformers model holds (adapters folded
in), the same arithmetic (RMSNorm, RoPE, grouped-query attention, SwiGLU, tied or separate output head), without
the generic forward's overhead (Cache objects, masks built per call, config lookups, module hooks). At demo size a
generated id is ~30 torch calls per layer; the matmuls are a third of its time, the rest is dispatch.

Exact rearrangements of the transformers weights (equal logits to 1e-4: tests/realtime/test_llama.py):
- each RMSNorm's weight (times sqrt(hidden)) is folded into the columns of the projection that follows it (q|k|v,
  gate|up, the head), and the attention scale 1/sqrt(head_dim) into q's rows; the norm itself divides the matmul's
  output rows by `hypot(|x|, sqrt(hidden * eps))`;
- q, k and v are one matmul (rows stacked), gate and up likewise; o_proj and down_proj add into the residual;
- RoPE acts on the whole q|k|v row with tables in which v's heads turn by nothing (cos 1, sin 0), so the new keys
  and values go into the cache with one copy.
`quantization="dynamic_int8"` swaps the projections for fbgemm's dynamic int8 linear (not exact: opt-in).
The float32 CPU projections of a prefill run on MKL or oneDNN (`gemm`; realtime/linear.py): the same products,
the library that is fast on the CPU at hand.

The decode step (one id, the jam's and evaluation's hot path) runs compiled where it can: float32 on the CPU
without quantization, `decode="auto"` calls realtime/kernels.py's numba function over the same folded weights and
the same cache (numpy arrays the torch tensors are views of: nothing is held twice), also for up to `STEPS_MAX` ids
one by one; the
torch ops below stay the path for longer prefills (torch's fused attention), other dtypes and devices, and
`decode="torch"`.

The cache holds `(layers, 2, kv_heads, max_len, head_dim)`; a forward writes positions `length ...` and raises
`length`; cropping lowers it; a fresh window sets it to 0. Nothing is allocated per step but the ops' outputs.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from realtime.linear import Dense, Int8, cpu_gemm

WEIGHT_PREFIX = "model."  # transformers' key prefix of the decoder stack (LlamaForCausalLM.model)
QUANTIZATIONS = ("none", "dynamic_int8")
DECODES = ("auto", "compiled", "torch")  # the one-id step: compiled where possible, compiled or fail, torch ops
# up to this many ids run as compiled steps, one by one (a human chord folded in, a few rest ids); more as one torch
# prefill. Measured on the demo model, one thread, after 128 ids: 2 ids 2.19 ms torch / 0.67 steps, 4 2.61 / 1.22,
# 8 2.70 / 2.55, 12 3.32 / 3.66
STEPS_MAX = 8


class UnsupportedModel(ValueError):
    """A config this forward does not compute exactly (another architecture, biases, scaled RoPE...)."""


@dataclass(frozen=True)
class LlamaShape:
    """The config fields the forward needs (read from a transformers LlamaConfig dict)."""

    vocab: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    rope_theta: float
    eps: float
    max_positions: int
    tied: bool

    @classmethod
    def from_config(cls, cfg: dict) -> LlamaShape:
        """Raises UnsupportedModel for what the forward would get wrong."""
        problems = [f"{k}={cfg.get(k)}" for k in ("attention_bias", "mlp_bias") if cfg.get(k)]
        if cfg.get("model_type", "llama") != "llama":
            problems.append(f"model_type={cfg.get('model_type')}")
        if cfg.get("hidden_act", "silu") != "silu":
            problems.append(f"hidden_act={cfg.get('hidden_act')}")
        rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
        if rope.get("rope_type", rope.get("type", "default")) != "default":
            problems.append(f"rope_type={rope.get('rope_type', rope.get('type'))}")
        if problems:
            raise UnsupportedModel(", ".join(problems))
        heads = int(cfg["num_attention_heads"])
        return cls(
            vocab=int(cfg["vocab_size"]),
            hidden=int(cfg["hidden_size"]),
            layers=int(cfg["num_hidden_layers"]),
            heads=heads,
            kv_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(cfg.get("head_dim") or cfg["hidden_size"] // heads),
            intermediate=int(cfg["intermediate_size"]),
            rope_theta=float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0))),
            eps=float(cfg.get("rms_norm_eps", 1e-6)),
            max_positions=int(cfg["max_position_embeddings"]),
            tied=bool(cfg.get("tie_word_embeddings", True)),
        )


def aligned(array: np.ndarray | None = None, shape: tuple = (), align: int = 64) -> np.ndarray:
    """A copy of `array` (or float32 zeros of `shape`) whose data starts on an `align`-byte boundary, as torch's own
    tensors do (numpy's allocations are 16-byte aligned): MKL's float32 gemm over weights 48 bytes past a cache line
    took 5 % longer on a 128-id prefill (AVX-512). The compiled step is indifferent (same time, same logits)."""
    dtype, shape = (np.dtype(np.float32), shape) if array is None else (array.dtype, array.shape)
    nbytes = math.prod(shape) * dtype.itemsize
    raw = np.empty(nbytes + align, np.uint8)
    start = -raw.ctypes.data % align
    out = raw[start : start + nbytes].view(dtype).reshape(shape)
    out[...] = 0 if array is None else array
    return out


class KVCache:
    """Keys and values of the first `length` positions of a window, preallocated for `max_len`."""

    def __init__(self, shape: LlamaShape, max_len: int, dtype: torch.dtype, device: torch.device):
        size = (shape.layers, 2, shape.kv_heads, max_len, shape.head_dim)
        # the compiled decode step's view of the same memory (CPU float32 only; numpy owns it, see _compiled_step)
        self.array = aligned(shape=size) if torch.device(device).type == "cpu" and dtype == torch.float32 else None
        self.kv = (
            torch.from_numpy(self.array) if self.array is not None else torch.zeros(size, dtype=dtype, device=device)
        )
        self.layer = list(self.kv.unbind(0))  # per layer (2, kv_heads, max_len, head_dim) views
        self.keys = [kv[0] for kv in self.layer]  # per layer (kv_heads, max_len, head_dim)
        self.values = [kv[1] for kv in self.layer]
        self.max_len = max_len
        self.length = 0

    def crop(self, remove: int) -> None:
        """Forget the last `remove` positions."""
        self.length = max(0, self.length - remove)


@dataclass
class _Layer:
    qkv: Dense | Int8  # hidden -> (heads + 2 kv_heads) * head_dim; input norm and attention scale folded in
    o: Dense | Int8  # heads * head_dim -> hidden, added to the residual
    gate_up: Dense | Int8  # hidden -> 2 intermediate; post-attention norm folded in
    down: Dense | Int8  # intermediate -> hidden, added to the residual


class LeanLlama:
    """The forward over one LlamaForCausalLM's weights; see the module docstring."""

    def __init__(
        self,
        shape: LlamaShape,
        weights: dict[str, torch.Tensor],
        quantization: str = "none",
        decode: str = "auto",
        gemm: str = "auto",
    ):
        if quantization not in QUANTIZATIONS:
            raise ValueError(f"quantization {quantization!r}: expected one of {QUANTIZATIONS}")
        if decode not in DECODES:
            raise ValueError(f"decode {decode!r}: expected one of {DECODES}")
        self.shape, self.quantization = shape, quantization
        self.embed = weights["embed_tokens.weight"]  # (vocab, hidden)
        self.dtype, self.device = self.embed.dtype, self.embed.device
        cpu_float32 = self.dtype == torch.float32 and self.device.type == "cpu" and quantization == "none"
        self.gemm = cpu_gemm(gemm) if cpu_float32 else "torch"  # bfloat16 on the CPU is oneDNN's already
        dense = functools.partial(Dense, onednn=self.gemm == "onednn")
        linear = Int8 if quantization == "dynamic_int8" else dense
        head = self.embed if shape.tied else weights["lm_head.weight"]
        self.head = linear(head * (weights["norm.weight"] * math.sqrt(shape.hidden)))
        self.layers = [_layer(shape, weights, f"layers.{i}.", linear) for i in range(shape.layers)]
        self.params = sum(w.numel() for w in weights.values())
        self._tables(shape.max_positions)
        self._step = self._compiled_step(decode)
        if self.gemm == "onednn":  # oneDNN's primitives before the first note; every layer has the same shapes
            first = self.layers[0]
            for dense in (first.qkv, first.o, first.gate_up, first.down, self.head):
                dense.build_buckets(shape.max_positions)

    @classmethod
    def from_state_dict(
        cls,
        config: dict,
        state: dict[str, torch.Tensor],
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        quantization: str = "none",
        decode: str = "auto",
        gemm: str = "auto",
    ) -> LeanLlama:
        """From a LlamaConfig dict and LlamaForCausalLM's state dict (`model.` prefix; lm_head absent when tied)."""
        shape = LlamaShape.from_config(config)
        weights = {k.removeprefix(WEIGHT_PREFIX): v.detach().to(dtype=dtype, device=device) for k, v in state.items()}
        return cls(shape, weights, quantization, decode, gemm)

    @classmethod
    def from_module(
        cls, model: torch.nn.Module, quantization: str = "none", decode: str = "auto", gemm: str = "auto"
    ) -> LeanLlama:
        """From a loaded transformers LlamaForCausalLM, in its dtype and on its device."""
        w = model.get_input_embeddings().weight
        state = model.state_dict()
        return cls.from_state_dict(model.config.to_dict(), state, w.dtype, w.device, quantization, decode, gemm)

    def _compiled_step(self, decode: str):
        """The compiled one-id step over these weights (None: the torch ops). Loads (or, the first time on a
        machine, compiles) it now, so that the first note never waits for it."""
        able = self.dtype == torch.float32 and self.device.type == "cpu" and self.quantization == "none"
        if decode == "torch" or (decode == "auto" and not able):
            return None
        if not able:
            raise ValueError(f"decode='compiled' needs float32 on the CPU without quantization, not {self.describe()}")
        from realtime.kernels import decode_step

        step = self._bind_step(decode_step)
        step(0, 0, self.new_cache(1).array)
        return step

    def _bind_step(self, kernel) -> _CompiledStep:
        """`kernel` over 64-byte aligned numpy copies of the weights and tables; the torch tensors become views of
        them. The kernel's arrays own their memory (held once), not the other way round: sending a tensor to another
        process (multiprocessing's reductions, as evaluation's pool does) moves its storage to shared memory, and a
        numpy view of the old storage would dangle."""
        stacks = {}
        for name in ("qkv", "o", "gate_up", "down"):  # (layers, in, out)
            stacks[name] = aligned(np.stack([getattr(layer, name).t.numpy() for layer in self.layers]))
            for i, layer in enumerate(self.layers):
                getattr(layer, name).t = torch.from_numpy(stacks[name][i])
        tables = []
        for name in ("embed", "cos", "sin"):
            array = aligned(getattr(self, name).numpy())
            setattr(self, name, torch.from_numpy(array))
            tables.append(array)
        head = aligned(self.head.t.numpy())
        self.head.t = torch.from_numpy(head)
        floor2 = np.float32(self.norm_floor.item() ** 2)
        tables.append(floor2)
        weights = (stacks["qkv"], stacks["o"], stacks["gate_up"], stacks["down"], head)
        return _CompiledStep(kernel, (*tables, *weights), self.shape.heads)

    def __getstate__(self) -> dict:
        """Pickled without the compiled step's arrays: numpy would send them again beside the torch tensors and
        unpickle them 16-byte aligned at addresses that vary from run to run (evaluation's processes did)."""
        state = self.__dict__.copy()
        if state["_step"] is not None:
            state["_step"] = state["_step"].kernel
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        if self._step is not None:  # the kernel: bound again over aligned copies of the tensors that came
            self._step = self._bind_step(self._step)

    def _tables(self, max_len: int) -> None:
        """RoPE cos/sin per position for the q|k|v row (v: cos 1, sin 0; sin's first half negated: `roll` then
        stands for rotate_half) and the causal mask for prefills."""
        s = self.shape
        inv_freq = 1.0 / (s.rope_theta ** (torch.arange(0, s.head_dim, 2, dtype=torch.int64).float() / s.head_dim))
        freqs = torch.outer(torch.arange(max_len, dtype=torch.float32), inv_freq)  # (max_len, head_dim / 2)
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos(), emb.sin()
        sin[:, : s.head_dim // 2] *= -1
        turned, kept = s.heads + s.kv_heads, s.kv_heads
        cos = torch.cat((cos[:, None].expand(-1, turned, -1), torch.ones(max_len, kept, s.head_dim)), dim=1)
        sin = torch.cat((sin[:, None].expand(-1, turned, -1), torch.zeros(max_len, kept, s.head_dim)), dim=1)
        self.cos = cos.to(self.dtype).to(self.device)  # (max_len, heads + 2 kv_heads, head_dim)
        self.sin = sin.to(self.dtype).to(self.device)
        self.causal = torch.ones(max_len, max_len, dtype=torch.bool, device=self.device).tril()
        # sqrt(hidden * eps): hypot(|x|, it) = sqrt(hidden) * sqrt(mean(x^2) + eps), RMSNorm's divisor up to the
        # sqrt(hidden) folded into the projections
        self.norm_floor = torch.tensor(math.sqrt(s.hidden * s.eps), dtype=torch.float32, device=self.device)

    def describe(self) -> str:
        """The backend in a few words: `lean-numba float32 cpu` (the decode step compiled), `lean-torch ...`, ending
        in ` onednn` where oneDNN multiplies the prefills."""
        quant = "" if self.quantization == "none" else f" {self.quantization}"
        step = "numba" if getattr(self, "_step", None) is not None else "torch"
        gemm = " onednn" if self.gemm == "onednn" else ""
        return f"lean-{step} {str(self.dtype).removeprefix('torch.')}{quant} {self.device}{gemm}"

    def new_cache(self, max_len: int | None = None) -> KVCache:
        """An empty cache for windows of up to `max_len` ids (default and limit: the model's positions)."""
        max_len = min(max_len or self.shape.max_positions, self.shape.max_positions)
        return KVCache(self.shape, max_len, self.dtype, self.device)

    def _rms(self, x: torch.Tensor) -> torch.Tensor:
        """(n, 1) RMSNorm divisor times sqrt(hidden): `hypot(|x|, sqrt(hidden * eps))`.

        The norm's weight and the 1 / sqrt(hidden) live in the next projection, which is divided by this: 2 ops where
        pow-mean-add-rsqrt-mul takes 5 (the decode step is dispatch-bound: ops, not flops, are its cost).
        """
        rms = torch.hypot(torch.linalg.vector_norm(x, dim=-1, keepdim=True, dtype=torch.float32), self.norm_floor)
        return rms if x.dtype == torch.float32 else rms.to(x.dtype)

    def forward(self, ids: list[int], cache: KVCache, keep: int = 1) -> torch.Tensor:
        """Run `ids` after the cache's `length` positions; the cache grows by `len(ids)`.

        Returns:
            (keep, vocab) float32 logits of the last `keep` positions.
        """
        s, start, n = self.shape, cache.length, len(ids)
        end = start + n
        rows = self._stepped(ids, cache)
        if rows is not None:
            rows = rows[-keep:]
            return torch.from_numpy(rows[0][None] if len(rows) == 1 else np.stack(rows))
        x = self._embed(ids)
        cos, sin = self.cos[start:end], self.sin[start:end]
        for i, layer in enumerate(self.layers):
            qkv = layer.qkv(x).div_(self._rms(x)).view(n, -1, s.head_dim)  # (n, heads + 2 kv_heads, head_dim)
            qkv = torch.addcmul(qkv * cos, qkv.roll(s.head_dim // 2, -1), sin)
            if n == 1:
                cache.layer[i].select(2, start).copy_(qkv[0, s.heads :].view(2, s.kv_heads, s.head_dim))
            else:
                cache.layer[i][:, :, start:end] = (
                    qkv[:, s.heads :].view(n, 2, s.kv_heads, s.head_dim).permute(1, 2, 0, 3)
                )
            attn = self._attend(qkv[:, : s.heads], cache.keys[i][:, :end], cache.values[i][:, :end], start)
            x = layer.o.add(x, attn)
            gate, up = layer.gate_up(x).div_(self._rms(x)).chunk(2, -1)
            x = layer.down.add(x, F.silu(gate).mul_(up))
        cache.length = end
        last = x[-keep:]
        return self.head(last).div_(self._rms(last)).float()

    def next_logits(self, ids: list[int], cache: KVCache) -> np.ndarray:
        """(vocab,) float32 logits after `ids`, run after the cache's positions as `forward` runs them: the engine's
        call per id. Through the compiled step it touches no torch at all (inference mode, tensor wrapping and
        unwrapping cost ~35 us of a ~0.5 ms id)."""
        rows = self._stepped(ids, cache)
        if rows is not None:
            return rows[-1]
        with torch.inference_mode():
            return self.forward(ids, cache)[0].numpy(force=True)

    def _stepped(self, ids: list[int], cache: KVCache) -> list[np.ndarray] | None:
        """Each id's logits from the compiled step, the cache grown by `len(ids)`; None where the step does not
        apply (more than `STEPS_MAX` ids, no compiled step, a cache numpy does not own): `forward` then runs."""
        start, n = cache.length, len(ids)
        if n == 0 or start + n > cache.max_len:
            raise ValueError(f"{start} cached + {n} new ids: need 1 to {cache.max_len - start}")
        if n > STEPS_MAX or self._step is None or cache.array is None:
            return None
        rows = [self._step(token, start + i, cache.array) for i, token in enumerate(ids)]
        cache.length = start + n
        return rows

    def _embed(self, ids: list[int]) -> torch.Tensor:
        """(n, hidden) embedding rows; one id is a view (no index tensor built on the decode step)."""
        if len(ids) == 1:
            return self.embed[ids[0] : ids[0] + 1]
        return F.embedding(torch.tensor(ids, device=self.device), self.embed)

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int) -> torch.Tensor:
        """Softmax attention of q (n, heads, head_dim; already scaled) over k, v (kv_heads, end, head_dim).

        Returns:
            (n, heads * head_dim).
        """
        s, n = self.shape, q.shape[0]
        if n == 1:  # one id: every cached position is visible; grouped heads are a view of q
            q = q.view(s.kv_heads, s.heads // s.kv_heads, s.head_dim)
            probs = torch.softmax(torch.bmm(q, k.mT), dim=-1)
            return torch.bmm(probs, v).view(1, -1)
        # 4-d inputs take torch's fused CPU kernel (half the time of the 3-d math path at 128 ids); from position 0
        # the causal mask is `is_causal` (a window's prefill: a slide, a prompt)
        end = k.shape[1]
        mask = None if start == 0 else self.causal[start:end, :end]
        out = F.scaled_dot_product_attention(
            q.transpose(0, 1)[None], k[None], v[None], attn_mask=mask, is_causal=start == 0, scale=1.0,
            enable_gqa=s.kv_heads != s.heads,
        )  # fmt: skip
        return out[0].transpose(0, 1).reshape(n, -1)


class _CompiledStep:
    """The compiled decode step bound to one model's arrays; picklable (evaluation sends engines to processes)."""

    def __init__(self, kernel, arrays: tuple, heads: int):
        self.kernel, self.arrays, self.heads = kernel, arrays, heads

    def __call__(self, token: int, pos: int, kv: np.ndarray) -> np.ndarray:
        return self.kernel(token, pos, *self.arrays, kv, self.heads)


def _layer(shape: LlamaShape, weights: dict[str, torch.Tensor], p: str, linear: type) -> _Layer:
    """One decoder layer's projections with its norms' weights and the attention scale folded in."""
    w = {k.removeprefix(p): v for k, v in weights.items() if k.startswith(p)}
    root = math.sqrt(shape.hidden)  # see LeanLlama._rms
    q = w["self_attn.q_proj.weight"] / math.sqrt(shape.head_dim)
    qkv = torch.cat((q, w["self_attn.k_proj.weight"], w["self_attn.v_proj.weight"])) * (
        w["input_layernorm.weight"] * root
    )
    gate_up = torch.cat((w["mlp.gate_proj.weight"], w["mlp.up_proj.weight"])) * (
        w["post_attention_layernorm.weight"] * root
    )
    return _Layer(
        qkv=linear(qkv), o=linear(w["self_attn.o_proj.weight"]), gate_up=linear(gate_up),
        down=linear(w["mlp.down_proj.weight"]),
    )  # fmt: skip
