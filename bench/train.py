"""Training benchmarks on synthetic windows, printed as one JSON object.

    python bench/train.py [--params params.yaml] [--steps 12] [--skip memory,restart] [--compare fp32,bf16]
    python bench/train.py --skip throughput,compare,memory,restart --data data/tokenize --base data/pretrain/base

- throughput: tokens/s of the base (pretrain loop) and of the QLoRA fine-tune, median over steps after warmup
- gemm: the step's float32 products at the demo's shapes on MKL and on oneDNN (pipeline/train/compute.py), GFLOP/s
- attention: one layer's causal attention, forward + backward (ms), as each `cpu_attention` computes it under autocast
- heap: the loop's step with glibc's heap kept between steps (compute.kept_heap, as fit trains) against its defaults
- compare: the loop's alternatives (COMPARE: precision, attention mask, fused AdamW, torch.compile, threads, batch)
  one step each in turn, per stage; tokens/s and tokens per CPU second as ratios to the first
- quality (with --data, a tokenize stage's folder): each QUALITY variant trains the params' full schedule on those
  windows; valid loss at each eval step (equal tokens), and the last one again in fp32
- checkpoint: size (MB) and write time (s) of a full-weights (pretrain) and an adapter-only (finetune) checkpoint
- memory: peak memory of one fine-tune on the same base as QLoRA (4-bit NF4), LoRA fp32, LoRA bf16 (each variant in
  its own process: CPU peak RSS only grows); `weights_mb` is the model's parameter + buffer bytes
- restart: seconds from starting `python -m pipeline.train --stage finetune` again after a SIGTERM to its first new step
Model and loop sizes come from the params file (defaults: the CPU demo profile); data shape from `tokenize`.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_choices import (  # noqa: E402
    COMPARE,
    STAGES,
    bench_attention,
    bench_compare,
    bench_gemm,
    bench_heap,
    bench_processes,
    bench_quality,
    heap_run,
    quality_run,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

WINDOWS = {"base": 400, "style": 600}  # synthetic train windows (the demo corpus' order of magnitude)
VARIANTS = ("qlora_nf4", "lora_fp32", "lora_bf16")


def _windows(n: int, seq: int, vocab: int, seed: int) -> np.ndarray:
    """(n, seq) int32: BOS then a noisy arithmetic progression of ids; every 4th window half padding."""
    rng = np.random.default_rng(seed)
    out = np.zeros((n, seq), np.int32)
    for i in range(n):
        length = seq if i % 4 else seq // 2
        body = 3 + (rng.integers(0, vocab) + 5 * np.arange(length - 1) + rng.integers(0, 2, length - 1)) % (vocab - 3)
        out[i, 0], out[i, 1:length] = 1, body
    return out


def make_workdir(root: Path, params: Path, steps: int) -> Path:
    """A project folder with synthetic token data, an untrained base bundle and a params file."""
    import torch
    import yaml

    from pipeline.core.config import load_config
    from pipeline.train.model import Vocab, build_base
    from realtime.bundle_format import write_bundle

    tree = yaml.safe_load(params.read_text()) if params.is_file() else {}
    tree = tree or {}
    paths = {"data_dir": str(root / "data"), "mlflow_uri": f"sqlite:///{root}/mlruns/mlflow.db"}
    tree["project"] = {**tree.get("project", {}), **paths, "artifact_dir": str(root / "mlruns")}
    for section in ("pretrain", "finetune"):
        tree[section] = {**tree.get(section, {}), "max_steps": steps, "warmup_steps": 1, "system_metrics": False}
    (root / "params.yaml").write_text(yaml.safe_dump(tree))
    cfg = load_config(root / "params.yaml")
    seq, vocab = cfg.tokenize.max_seq_len, Vocab(cfg.tokenize.vocab_size, 0, 1, 2)
    tok = cfg.stage_dir("tokenize")
    corpora = {**WINDOWS, **{f"style/{name}": WINDOWS["style"] for name in cfg.styles}}  # the stage's layout too
    for corpus, n in corpora.items():
        (tok / corpus).mkdir(parents=True, exist_ok=True)
        np.save(tok / corpus / "train.npy", _windows(n, seq, vocab.size, 0))
        np.save(tok / corpus / "valid.npy", _windows(max(4, n // 10), seq, vocab.size, 1))
    (tok / "tokenizer.json").write_text("{}")
    stats = {"vocab_size": vocab.size, "pad_id": 0, "bos_id": 1, "eos_id": 2, "kind": "synthetic",
             "max_seq_len": seq, "overlap": 0, "tokenizer_sha256": "0" * 64}  # fmt: skip
    (tok / "report.json").write_text(json.dumps({"stats": stats}))
    torch.manual_seed(0)
    out = cfg.stage_dir("pretrain")
    build_base(cfg.model, vocab, seq).save_pretrained(out / ".base")
    write_bundle(out, out / ".base", tok / "tokenizer.json", {}, source_run_id="")
    return root


def _timed_store(url: Path):
    from pipeline.train.checkpoint import CheckpointStore

    class TimedStore(CheckpointStore):
        def save(self, step, write, meta=None):
            t0 = time.perf_counter()
            where = super().save(step, write, meta)
            self.seconds.append(time.perf_counter() - t0)
            return where

    store = TimedStore(url, keep=1)
    store.seconds = []
    return store


def bench_loop(root: Path, stage: str) -> dict:
    """Tokens/s and checkpoint size/time of a few steps of `stage` (pretrain: full weights; finetune: adapter)."""
    from pipeline.core.config import load_config
    from pipeline.train.dataset import TokenWindows
    from pipeline.train.finetune import qlora_model
    from pipeline.train.loop import TrainJob, fit
    from pipeline.train.model import Vocab, build_base

    cfg = load_config(root / "params.yaml")
    loop, corpus = getattr(cfg, stage), cfg.stage_dir("tokenize") / ("base" if stage == "pretrain" else "style")
    vocab = Vocab(cfg.tokenize.vocab_size, 0, 1, 2)
    if stage == "pretrain":
        build = lambda device: build_base(cfg.model, vocab, cfg.tokenize.max_seq_len).to(device)  # noqa: E731
    else:
        build = lambda device: qlora_model(cfg.stage_dir("pretrain") / "base", cfg.finetune, device)  # noqa: E731
    speeds: list[float] = []
    store = _timed_store(root / f"ckpt-{stage}")
    job = TrainJob(build, TokenWindows(corpus / "train.npy", 0), None, loop, store, cfg.project.seed, "bench",
                   every_steps=max(2, loop.max_steps // 2), every_s=1e9, adapter_only=stage == "finetune",
                   on_step=lambda step, m: speeds.append(m.get("tokens_per_s", 0.0)))  # fmt: skip
    fit(job)
    ckpt = store.latest()
    size = sum(f["bytes"] for f in ckpt.manifest["files"].values())
    return {
        "tokens_per_s": round(statistics.median(speeds[2:] or speeds), 1),
        "steps": len(speeds),
        "batch_windows": loop.batch_size * loop.grad_accum,
        "checkpoint_mb": round(size / 2**20, 3),
        "checkpoint_write_s": round(statistics.median(store.seconds[1:] or store.seconds), 3),
    }


def memory_variant(root: Path, variant: str, steps: int) -> dict:
    """One fine-tune variant in this process; returns its peak memory and speed."""
    import torch

    from pipeline.core.config import load_config
    from pipeline.registry.tracking import rss_mb
    from pipeline.train.dataset import Batches, TokenWindows
    from pipeline.train.loop import make_optimizer
    from pipeline.train.model import add_lora, load_base

    cfg = load_config(root / "params.yaml")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    base = cfg.stage_dir("pretrain") / "base"
    rss0 = rss_mb("VmRSS")  # MiB after imports, before the model
    if variant == "qlora_nf4":
        model = load_base(base, "nf4", True, cfg.finetune.compute_dtype, device)
    else:
        from transformers import LlamaForCausalLM

        dtype = torch.bfloat16 if variant == "lora_bf16" else torch.float32
        model = LlamaForCausalLM.from_pretrained(base, dtype=dtype).to(device)
    model = add_lora(model, cfg.finetune)
    weights = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    opt = make_optimizer([p for p in model.parameters() if p.requires_grad], cfg.finetune)
    data = Batches(TokenWindows(cfg.stage_dir("tokenize") / "style" / "train.npy", 0), cfg.finetune.batch_size, 0)
    times = []
    for step in range(steps):
        batch = {k: v.to(device) for k, v in data.get(0, step % data.per_epoch).items()}
        t0 = time.perf_counter()
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad()
        times.append((time.perf_counter() - t0, int(batch["attention_mask"].sum())))
    peak = rss_mb("VmHWM")
    out = {"weights_mb": round(weights / 2**20, 2), "peak_rss_mb": round(peak, 1),
           "peak_over_imports_mb": round(peak - rss0, 1),
           "tokens_per_s": round(statistics.median(n / t for t, n in times[1:] or times), 1)}  # fmt: skip
    if device.type == "cuda":
        out["cuda_max_allocated_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return out


def bench_memory(root: Path, steps: int) -> dict:
    results = {}
    for variant in VARIANTS:
        cmd = [sys.executable, __file__, "--variant", variant, "--workdir", str(root), "--steps", str(steps)]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
        results[variant] = json.loads(lines[-1]) if proc.returncode == 0 and lines else {"error": proc.stderr[-500:]}
    return results


def bench_restart(root: Path) -> dict:
    """SIGTERM a fine-tune after its third step, restart it, time start -> resumed -> first new step."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "pipeline.train", "--stage", "finetune", "-p", "params.yaml", "--fresh"]
    proc = subprocess.Popen(cmd, cwd=root, env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    for line in proc.stderr:
        if re.search(r"step 3/", line):
            proc.send_signal(signal.SIGTERM)
            break
    proc.communicate(timeout=600)
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd[:-1], cwd=root, env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    marks = {}
    for line in proc.stderr:
        if "resumed from step" in line and "resumed_s" not in marks:
            marks["resumed_s"] = round(time.monotonic() - t0, 2)
        elif "resumed_s" in marks and re.search(r"step \d+/", line):
            marks["first_step_s"] = round(time.monotonic() - t0, 2)
            proc.send_signal(signal.SIGTERM)
            break
    proc.communicate(timeout=600)
    return {"restart_to_resumed_s": marks.get("resumed_s"), "restart_to_first_new_step_s": marks.get("first_step_s")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--params", type=Path, default=REPO / "params.yaml")
    parser.add_argument("--steps", type=int, default=12, help="optimizer steps per measurement")
    parser.add_argument(
        "--skip",
        default="",
        help="comma list of: throughput, gemm, attention, heap, compare, memory, restart, quality",
    )
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)  # internal: one memory variant
    parser.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, help="a tokenize stage's folder: also compare valid loss (quality)")
    parser.add_argument("--base", type=Path, help="base folder fine-tune quality starts from (a pretrain's base/)")
    parser.add_argument("--quality-stages", default="pretrain,finetune")
    parser.add_argument("--quality", default="fp32,bf16", help="comma list of QUALITY variants (first = reference)")
    parser.add_argument("--seeds", default="", help="comma list of seeds for quality (default: the params' seed)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="quality trainings run at a time")
    parser.add_argument("--compare", default="", help=f"comma list of {', '.join(COMPARE)} (first = reference)")
    parser.add_argument("--rounds", type=int, default=8, help="interleaved steps per compare variant")
    parser.add_argument(
        "--processes",
        type=int,
        default=0,
        help="also time N torchrun processes of one thread against one process (whole runs)",
    )
    parser.add_argument("--quality-run", help=argparse.SUPPRESS)  # internal: one quality variant
    parser.add_argument("--heap-run", type=int, help=argparse.SUPPRESS)  # internal: one side of the heap section
    args = parser.parse_args()
    if args.quality_run:
        spec = json.loads(args.quality_run)
        print(
            json.dumps(
                quality_run(args.data, spec["stage"], args.params, spec["overrides"], args.base, spec.get("seed"))
            )
        )
        return
    if args.variant:
        print(json.dumps(memory_variant(args.workdir, args.variant, args.steps)))
        return
    if args.heap_run is not None:
        print(json.dumps(heap_run(args.workdir, bool(args.heap_run), args.rounds)))
        return
    import torch

    skip = set(filter(None, args.skip.split(",")))
    with tempfile.TemporaryDirectory(prefix="jam-bench-train-") as tmp:
        root = make_workdir(Path(tmp), args.params, args.steps)
        result: dict = {"device": "cuda" if torch.cuda.is_available() else "cpu", "threads": torch.get_num_threads()}
        if "throughput" not in skip:
            result["pretrain"] = bench_loop(root, "pretrain")
            result["finetune_qlora"] = bench_loop(root, "finetune")
        if "gemm" not in skip:  # rows: one demo batch (16 windows x 256); (in, out) of each projection
            shapes = {"attention": (192, 192), "mlp_up": (192, 512), "mlp_down": (512, 192), "head": (192, 1024)}
            result["gemm_gflops"] = bench_gemm(16 * 256, shapes, args.rounds * 3)
        if "attention" not in skip:  # one layer at the params' training shape
            from pipeline.core.config import load_config

            cfg = load_config(args.params)
            heads, seq = cfg.model.num_heads, cfg.tokenize.max_seq_len
            shape = (cfg.pretrain.batch_size, heads, seq, cfg.model.hidden_size // heads)
            result["attention"] = {"shape": shape, **bench_attention(*shape, args.rounds * 3)}
        if "heap" not in skip:
            result["heap"] = bench_heap(root, args.rounds)
        if "compare" not in skip:
            names = args.compare.split(",") if args.compare else list(COMPARE)
            result["compare"] = {stage: bench_compare(root, stage, args.rounds, names) for stage in STAGES}
        if args.processes > 1:
            result["processes"] = bench_processes(root, list(STAGES), max(1, args.rounds // 4), args.processes)
        if "memory" not in skip:
            result["memory"] = bench_memory(root, min(args.steps, 6))
        if "restart" not in skip:
            result["restart"] = bench_restart(root)
        if args.data is not None and "quality" not in skip:
            stages = args.quality_stages.split(",")
            from pipeline.core.config import load_config

            seeds = [int(s) for s in args.seeds.split(",") if s] or [load_config(args.params).project.seed]
            names = args.quality.split(",")
            result["quality"] = bench_quality(
                args.params, args.data.resolve(), args.base, stages, names, seeds, args.jobs
            )
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
