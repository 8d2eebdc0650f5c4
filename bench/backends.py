"""The forward's alternatives side by side, in one process on the same ids; prints JSON with ratios.

    python bench/backends.py                                  # data/finetune/bundle, else a random demo-size model
    python bench/backends.py --model path/to/bundle --rounds 7
    python bench/backends.py --size gpu                       # params-gpu.yaml's shape, random weights
    python bench/backends.py --compile                        # + transformers static cache + torch.compile (minutes)
    python bench/backends.py --aoti                           # + the decode step compiled by AOTInductor (gcc)
    python bench/backends.py --onnx                           # + the decode step in ONNX Runtime (needs onnx, below)

Per backend: `decode_ms` (one id after 128 cached, median over rounds of 64-step runs), `prefill_128_ms` (128 ids
into an empty cache), `max_abs_diff` of its logits against transformers' eager forward on the same ids (prefill, all
positions, and the decode steps), and both times as ratios to transformers eager. Rounds interleave the backends,
so machine load hits them alike. The runner plays `lean` (realtime/llama.py: torch ops for prefills, the decode
step compiled by numba, realtime/kernels.py); `lean_torch` is the same forward with its decode step in torch ops;
`lean_mkl` and `lean_onednn` are lean with its prefills' projections on each library (`lean` takes `cpu_gemm`'s
choice for this CPU); the others are here to be measured.

`--aoti` and `--onnx` run the lean forward's decode step (one id at a position, the preallocated KV cache as an
input, the new keys and values as an output that Python writes into the cache) compiled ahead of time: by
AOTInductor to a shared library (torch + a C++ compiler), or exported to ONNX and run by onnxruntime (installed;
exporting needs `pip install onnx onnxscript onnx-ir ml_dtypes`, not in the venv). Their prefill is lean's.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
import torch.nn.functional as F

from realtime.bundle import load_model
from realtime.llama import LeanLlama

CTX, STEPS, PREFILL = 128, 64, 128
SIZES = {  # random-weight models of the two profiles (params.yaml, params-gpu.yaml)
    "demo": {"hidden": 192, "layers": 4, "heads": 6, "kv_heads": None, "intermediate": 512},
    "gpu": {"hidden": 512, "layers": 8, "heads": 8, "kv_heads": 4, "intermediate": 1408},
}


class HFEager:
    """transformers' forward with its DynamicCache: what the engine called before realtime/llama.py."""

    def __init__(self, model: torch.nn.Module):
        self.model = model

    def prefill(self, ids: list[int]) -> tuple[torch.Tensor, object]:
        out = self.model(input_ids=torch.tensor([ids]), use_cache=True)
        return out.logits[0].float(), out.cache

    def step(self, token: int, cache: object) -> torch.Tensor:
        out = self.model(input_ids=torch.tensor([[token]]), cache=cache, use_cache=True, logits_to_keep=1)
        return out.logits[0, -1].float()

    def reset(self, cache: object, length: int) -> None:
        cache.crop(length - cache.get_seq_length())


class HFStaticCompiled(HFEager):
    """transformers with a StaticCache and `torch.compile` of the forward (fixed shapes: one graph per length)."""

    def __init__(self, model: torch.nn.Module, max_len: int):
        super().__init__(model)
        from transformers import StaticCache

        self.cache = StaticCache(config=model.config, max_cache_len=max_len)
        self.forward = torch.compile(model.forward, dynamic=False, fullgraph=False)

    def prefill(self, ids: list[int]) -> tuple[torch.Tensor, object]:
        self.cache.reset()
        pos = torch.arange(len(ids))
        out = self.forward(input_ids=torch.tensor([ids]), cache=self.cache, cache_position=pos, use_cache=True)
        self.length = len(ids)
        return out.logits[0].float(), self.cache

    def step(self, token: int, cache: object) -> torch.Tensor:
        pos = torch.tensor([self.length])
        out = self.forward(input_ids=torch.tensor([[token]]), cache=cache, cache_position=pos, use_cache=True)
        self.length += 1
        return out.logits[0, -1].float()

    def reset(self, cache: object, length: int) -> None:
        self.length = length  # later positions are overwritten before they are read


class Lean:
    """The runner's forward (realtime/llama.py)."""

    def __init__(self, model: LeanLlama):
        self.model = model

    def prefill(self, ids: list[int]) -> tuple[torch.Tensor, object]:
        cache = self.model.new_cache()
        return self.model.forward(ids, cache, keep=len(ids)), cache

    def step(self, token: int, cache: object) -> torch.Tensor:
        return self.model.forward([token], cache)[0]

    def reset(self, cache: object, length: int) -> None:
        cache.length = length


class DecodeStep(torch.nn.Module):
    """LeanLlama's arithmetic for one id at position `pos` over a preallocated cache, in plain tensor ops that
    export: (token (1,), pos (1,), kv (layers, 2, kv_heads, max_len, head_dim); positions < pos valid) ->
    (logits (1, vocab), new keys and values (layers, 2, kv_heads, head_dim)). Weights are buffers (constants)."""

    def __init__(self, lean: LeanLlama):
        super().__init__()
        self.shape = lean.shape
        tables = {"embed": lean.embed, "cos": lean.cos, "sin": lean.sin, "floor": lean.norm_floor, "head": lean.head.t}
        for name, tensor in tables.items():
            self.register_buffer(name, tensor)
        for i, layer in enumerate(lean.layers):
            for name in ("qkv", "o", "gate_up", "down"):
                self.register_buffer(f"l{i}_{name}", getattr(layer, name).t)

    def _rms(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sqrt((x * x).sum(-1, keepdim=True) + self.floor * self.floor)

    def forward(self, token: torch.Tensor, pos: torch.Tensor, kv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s = self.shape
        group = s.heads // s.kv_heads
        x = self.embed.index_select(0, token)
        cos, sin = self.cos.index_select(0, pos), self.sin.index_select(0, pos)
        valid = torch.arange(kv.shape[3])[None, None, :] < pos  # (1, 1, max_len)
        news = []
        for i in range(s.layers):
            w = {n: getattr(self, f"l{i}_{n}") for n in ("qkv", "o", "gate_up", "down")}
            qkv = (x @ w["qkv"] / self._rms(x)).view(1, -1, s.head_dim)
            qkv = qkv * cos + qkv.roll(s.head_dim // 2, -1) * sin
            q, new = qkv[0, : s.heads].view(s.kv_heads, group, s.head_dim), qkv[0, s.heads :].view(2, s.kv_heads, -1)
            news.append(new)
            cached = torch.bmm(q, kv[i, 0].transpose(1, 2)).masked_fill(~valid, float("-inf"))  # (kv, group, len)
            own = (q * new[0][:, None, :]).sum(-1, keepdim=True)  # the new id attends to itself
            probs = torch.softmax(torch.cat((cached, own), -1), -1)
            attn = torch.bmm(probs[..., :-1], kv[i, 1]) + probs[..., -1:] * new[1][:, None, :]
            x = x + attn.reshape(1, -1) @ w["o"]
            gate, up = (x @ w["gate_up"] / self._rms(x)).chunk(2, -1)
            x = x + (F.silu(gate) * up) @ w["down"]
        return x @ self.head / self._rms(x), torch.stack(news)


class CompiledStep(Lean):
    """A `DecodeStep` compiled for decoding (kind "aoti", "onnx"; "eager": not compiled); prefill is lean's, into
    the same cache."""

    def __init__(self, model: LeanLlama, kind: str, folder: Path):
        super().__init__(model)
        step = DecodeStep(model).eval()
        example = (torch.tensor([3]), torch.tensor([1]), model.new_cache().kv)
        started = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if kind == "eager":  # the module itself (tests: what the compiled kinds compute)
                self.run = step
            elif kind == "torchscript":  # traced and frozen: TorchScript's interpreter, no compiler needed
                traced = torch.jit.freeze(torch.jit.trace(step, example, check_trace=False))
                traced = torch.jit.optimize_for_inference(traced)
                self.run = traced
            elif kind == "aoti":
                package = torch._inductor.aoti_compile_and_package(
                    torch.export.export(step, example), package_path=str(folder / "step.pt2")
                )
                loader = torch._inductor.aoti_load_package(package).loader  # boxed_run: no pytree per call
                self.run = lambda t, p, kv: loader.boxed_run([t, p, kv])
            else:
                import onnxruntime

                program = torch.onnx.export(step, example, dynamo=True, verbose=False)
                program.save(str(folder / "step.onnx"))
                options = onnxruntime.SessionOptions()
                options.intra_op_num_threads, options.inter_op_num_threads = torch.get_num_threads(), 1
                session = onnxruntime.InferenceSession(str(folder / "step.onnx"), options)
                names = [i.name for i in session.get_inputs()]

                def run(t: torch.Tensor, p: torch.Tensor, kv: torch.Tensor) -> list[torch.Tensor]:
                    feeds = dict(zip(names, (t.numpy(), p.numpy(), kv.numpy()), strict=True))  # numpy views
                    return [torch.from_numpy(o) for o in session.run(None, feeds)]

                self.run = run
        self.compile_s = time.perf_counter() - started

    def step(self, token: int, cache: object) -> torch.Tensor:
        logits, new = self.run(torch.tensor([token]), torch.tensor([cache.length]), cache.kv)
        cache.kv.select(3, cache.length).copy_(new)
        cache.length += 1
        return logits[0]


def make_backends(
    model: torch.nn.Module, compile_: bool, steps: tuple[str, ...] = (), folder: Path | None = None
) -> dict[str, object]:
    """Every alternative over the same (merged) transformers model."""
    from torch.ao.quantization import quantize_dynamic

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch deprecates its quantized tensors in favour of torchao
        hf_int8 = quantize_dynamic(load_copy(model), {torch.nn.Linear}, dtype=torch.qint8)
    state, cfg = model.state_dict(), model.config.to_dict()
    out = {
        "transformers_eager": HFEager(model),
        "transformers_int8": HFEager(hf_int8),
        "lean": Lean(LeanLlama.from_module(model)),
        "lean_torch": Lean(LeanLlama.from_module(model, decode="torch")),
        "lean_mkl": Lean(LeanLlama.from_module(model, gemm="mkl")),  # lean's prefills on each library (cpu_gemm)
        "lean_onednn": Lean(LeanLlama.from_module(model, gemm="onednn")),
        "lean_int8": Lean(LeanLlama.from_module(model, quantization="dynamic_int8")),
        "lean_bfloat16": Lean(LeanLlama.from_state_dict(cfg, state, dtype=torch.bfloat16)),
    }
    for kind in steps:  # "aoti", "onnx", "torchscript"
        out[f"lean_step_{kind}"] = CompiledStep(LeanLlama.from_module(model), kind, folder)
    if compile_:
        out["transformers_static_compile"] = HFStaticCompiled(load_copy(model), model.config.max_position_embeddings)
    return out


def load_copy(model: torch.nn.Module) -> torch.nn.Module:
    import copy

    return copy.deepcopy(model).eval()


def measure(backend, ids: list[int]) -> tuple[float, float, list[torch.Tensor], torch.Tensor]:
    """(decode ms per id, prefill ms, decode logits, prefill logits) of one round."""
    started = time.perf_counter()
    full, _ = backend.prefill(ids[:PREFILL])
    prefill_ms = (time.perf_counter() - started) * 1e3
    _, cache = backend.prefill(ids[:CTX])
    started = time.perf_counter()
    steps = [backend.step(t, cache) for t in ids[CTX : CTX + STEPS]]
    decode_ms = (time.perf_counter() - started) * 1e3 / STEPS
    backend.reset(cache, CTX)
    return decode_ms, prefill_ms, steps, full


def compare(backends: dict[str, object], ids: list[int], rounds: int) -> dict[str, dict]:
    """Interleaved rounds (the first warms up, and compiles); medians, ratios, logit differences."""
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in backends}
    logits: dict[str, tuple] = {}
    with torch.inference_mode():
        for r in range(rounds + 1):
            for name, backend in backends.items():
                decode_ms, prefill_ms, steps, full = measure(backend, ids)
                if r:
                    times[name].append((decode_ms, prefill_ms))
                logits[name] = (torch.stack(steps), full)
    ref_steps, ref_full = logits["transformers_eager"]
    out = {}
    for name, pairs in times.items():
        decode = statistics.median(d for d, _ in pairs)
        prefill = statistics.median(p for _, p in pairs)
        steps, full = logits[name]
        diff = max((steps - ref_steps).abs().max().item(), (full - ref_full).abs().max().item())
        out[name] = {"decode_ms": round(decode, 4), "prefill_128_ms": round(prefill, 3), "max_abs_diff": diff}
    base = out["transformers_eager"]
    for row in out.values():
        row["decode_speedup"] = round(base["decode_ms"] / row["decode_ms"], 2)
        row["prefill_speedup"] = round(base["prefill_128_ms"] / row["prefill_128_ms"], 2)
    return out


def random_model(size: dict, tmp: Path) -> Path:
    from realtime.synthetic import make_random_bundle

    return make_random_bundle(tmp / "bundle", hidden=size["hidden"], layers=size["layers"], heads=size["heads"],
                              kv_heads=size["kv_heads"], intermediate=size["intermediate"])  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="bundle folder (default: data/finetune/bundle if present)")
    ap.add_argument("--size", choices=sorted(SIZES), default=None, help="a random model of this profile instead")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--compile", action="store_true", help="also transformers static cache + torch.compile")
    ap.add_argument("--aoti", action="store_true", help="also the decode step compiled by AOTInductor")
    ap.add_argument("--onnx", action="store_true", help="also the decode step in ONNX Runtime (needs onnx)")
    ap.add_argument("--torchscript", action="store_true", help="also the decode step traced by TorchScript")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        default = Path("data/finetune/bundle")
        path = Path(args.model) if args.model else default if default.exists() and not args.size else None
        name = str(path) if path else f"random {args.size or 'demo'}: {SIZES[args.size or 'demo']}"
        model = load_model(path or random_model(SIZES[args.size or "demo"], Path(tmp)))
        ids = torch.randint(3, model.config.vocab_size, (CTX + STEPS,), generator=torch.Generator().manual_seed(0))
        steps = tuple(
            k for k, on in (("aoti", args.aoti), ("onnx", args.onnx), ("torchscript", args.torchscript)) if on
        )
        if args.onnx:
            try:
                import onnx  # noqa: F401
                import onnxscript  # noqa: F401
            except ImportError as err:
                sys.exit(f"--onnx: {err}; pip install onnx onnxscript onnx-ir ml_dtypes")
        backends = make_backends(model, args.compile, steps, Path(tmp))
        result = compare(backends, ids.tolist(), args.rounds)
        for label, backend in backends.items():
            if hasattr(backend, "compile_s"):
                result[label]["compile_s"] = round(backend.compile_s, 1)
    params = sum(p.numel() for p in model.parameters())
    print(json.dumps({"model": name, "params_m": round(params / 1e6, 3),
                      "threads": args.threads, "cpu": platform.processor() or platform.machine(),
                      "load_avg": os.getloadavg(), "backends": result}, indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
