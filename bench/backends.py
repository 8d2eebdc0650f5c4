"""The forward's alternatives side by side, in one process on the same ids; prints JSON with ratios.

    python bench/backends.py                                  # data/finetune/bundle, else a random demo-size model
    python bench/backends.py --model path/to/bundle --rounds 7
    python bench/backends.py --size gpu                       # params-gpu.yaml's shape, random weights
    python bench/backends.py --compile                        # + transformers static cache + torch.compile (minutes)

Per backend: `decode_ms` (one id after 128 cached, median over rounds of 64-step runs), `prefill_128_ms` (128 ids
into an empty cache), `max_abs_diff` of its logits against transformers' eager forward on the same ids (prefill, all
positions, and the decode steps), and both times as ratios to transformers eager. Rounds interleave the backends,
so machine load hits them alike. The runner plays `lean` (realtime/llama.py); the others are here to be measured.
ONNX Runtime with KV-cache inputs is not measured: exporting needs the `onnx` package, which is not installed.
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


def make_backends(model: torch.nn.Module, compile_: bool) -> dict[str, object]:
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
        "lean_int8": Lean(LeanLlama.from_module(model, quantization="dynamic_int8")),
        "lean_bfloat16": Lean(LeanLlama.from_state_dict(cfg, state, dtype=torch.bfloat16)),
    }
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
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        default = Path("data/finetune/bundle")
        path = Path(args.model) if args.model else default if default.exists() and not args.size else None
        name = str(path) if path else f"random {args.size or 'demo'}: {SIZES[args.size or 'demo']}"
        model = load_model(path or random_model(SIZES[args.size or "demo"], Path(tmp)))
        ids = torch.randint(3, model.config.vocab_size, (CTX + STEPS,), generator=torch.Generator().manual_seed(0))
        result = compare(make_backends(model, args.compile), ids.tolist(), args.rounds)
    params = sum(p.numel() for p in model.parameters())
    print(json.dumps({"model": name, "params_m": round(params / 1e6, 3),
                      "threads": args.threads, "cpu": platform.processor() or platform.machine(),
                      "load_avg": os.getloadavg(), "backends": result}, indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
