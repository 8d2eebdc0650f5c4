"""Training benchmarks on synthetic windows, printed as one JSON object.

    python bench/train.py [--params params.yaml] [--steps 12] [--skip memory,restart]

- throughput: tokens/s of the base (pretrain loop) and of the QLoRA fine-tune, median over steps after warmup
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
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

WINDOWS = {"base": 400, "style": 600}  # synthetic train windows (the demo corpus' order of magnitude)
VARIANTS = ("qlora_nf4", "lora_fp32", "lora_bf16")
STAGES = ("pretrain", "finetune")


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
    for corpus, n in WINDOWS.items():
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


def quality_run(tok_dir: Path, stage: str, params: Path, overrides: dict, base_dir: Path | None) -> dict:
    """One real training of `stage` on a tokenize stage's windows (`tok_dir`) with `overrides` of its loop section.

    Returns the valid loss at each eval step (with the tokens trained by then), the median tokens/s and the wall
    time; the style for fine-tuning is the first folder under `tok_dir/style`.
    """
    import torch

    from pipeline.core.config import load_config
    from pipeline.train.checkpoint import CheckpointStore
    from pipeline.train.dataset import TokenWindows, dataset_info
    from pipeline.train.finetune import qlora_model
    from pipeline.train.loop import TrainJob, evaluate, fit
    from pipeline.train.model import Vocab, build_base

    cfg = load_config(params)
    cfg = cfg.model_copy(update={stage: getattr(cfg, stage).model_copy(update={**overrides, "system_metrics": False})})
    vocab, loop = Vocab.from_info(dataset_info(tok_dir)), getattr(cfg, stage)
    corpus = tok_dir / "base" if stage == "pretrain" else sorted((tok_dir / "style").iterdir())[0]
    if stage == "pretrain":
        build = lambda device: build_base(cfg.model, vocab, cfg.tokenize.max_seq_len).to(device)  # noqa: E731
    else:
        build = lambda device: qlora_model(base_dir, cfg.finetune, device)  # noqa: E731
    curve, speeds = [], []

    def on_step(step: int, metrics: dict) -> None:
        speeds.append(metrics.get("tokens_per_s", 0.0))
        if "valid_loss" in metrics:
            curve.append([step, round(metrics["valid_loss"], 4)])

    with tempfile.TemporaryDirectory(prefix="jam-bench-quality-") as tmp:
        job = TrainJob(build, TokenWindows(corpus / "train.npy", vocab.pad_id),
                       TokenWindows(corpus / "valid.npy", vocab.pad_id), loop, CheckpointStore(Path(tmp), keep=1),
                       cfg.project.seed, "bench", every_steps=loop.max_steps, every_s=1e9,
                       adapter_only=stage == "finetune", on_step=on_step)  # fmt: skip
        t0 = time.perf_counter()
        result = fit(job)
        seconds = time.perf_counter() - t0
    model = result.model
    model.forward = getattr(model, "_original_forward", model.forward)  # accelerate's autocast wrapper off
    final = evaluate(model, job.valid_ds, result.accelerator, loop.batch_size)
    return {"valid_loss": curve, "final_valid_loss_fp32": round(final, 4), "corpus": corpus.name,
            "tokens_per_s": round(statistics.median(speeds[2:] or speeds), 1), "train_s": round(seconds, 1),
            "threads": torch.get_num_threads()}  # fmt: skip


# Side by side, interleaved step by step (the machine is shared: ratios to "fp32" are the figures to read; with one
# torch thread, `cpu_ratio` (tokens per CPU second) is the least disturbed by other processes).
# Each starts from today's loop: fp32, attention mask passed, AdamW foreach, torch's default threads, eager.
COMPARE = {
    "fp32": {},
    "fp32_no_mask": {"mask": False},
    "bf16": {"bf16": True},
    "bf16_no_mask": {"bf16": True, "mask": False},
    "bf16_fused_adamw": {"bf16": True, "fused": True},
    "bf16_compile": {"bf16": True, "compile": True},
    "bf16_1_thread": {"bf16": True, "threads": 1},
    "bf16_batch_x2": {"bf16": True, "batch": 2},
}


def _compare_step(root: Path, stage: str, spec: dict):
    """A closure training one step of `stage` as `spec` says; returns (seconds, non-pad tokens) per call."""
    import contextlib

    import torch

    from pipeline.core.config import load_config
    from pipeline.train.dataset import Batches, TokenWindows
    from pipeline.train.finetune import qlora_model
    from pipeline.train.model import Vocab, build_base

    cfg = load_config(root / "params.yaml")
    loop, corpus = getattr(cfg, stage), cfg.stage_dir("tokenize") / ("base" if stage == "pretrain" else "style")
    torch.manual_seed(0)
    if stage == "pretrain":
        model = build_base(cfg.model, Vocab(cfg.tokenize.vocab_size, 0, 1, 2), cfg.tokenize.max_seq_len)
    else:
        model = qlora_model(cfg.stage_dir("pretrain") / "base", cfg.finetune, torch.device("cpu"))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    fused = {"fused": True} if spec.get("fused") else {"foreach": True}
    opt = torch.optim.AdamW(params, lr=loop.lr, betas=(0.9, 0.95), weight_decay=loop.weight_decay, **fused)
    forward = torch.compile(model) if spec.get("compile") else model
    data = Batches(TokenWindows(corpus / "train.npy", 0), loop.batch_size * spec.get("batch", 1), cfg.project.seed)
    threads, position = spec.get("threads") or torch.get_num_threads(), [0]

    def step() -> tuple[float, int]:
        batch = data.get(0, position[0] % data.per_epoch)
        position[0] += 1
        tokens = int(batch["attention_mask"].sum())
        if spec.get("mask", True) is False:
            batch = {k: v for k, v in batch.items() if k != "attention_mask"}
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        amp = torch.autocast("cpu", dtype=torch.bfloat16) if spec.get("bf16") else contextlib.nullcontext()
        t0, c0 = time.perf_counter(), time.process_time()
        with amp:
            loss = forward(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, loop.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
        torch.set_num_threads(before)
        return seconds, cpu, tokens

    return step


def bench_compare(root: Path, stage: str, rounds: int, names: list[str]) -> dict:
    """tokens/s of each COMPARE variant, one step each in turn for `rounds` rounds; ratios to the first per round."""
    steps = {name: _compare_step(root, stage, COMPARE[name]) for name in names}
    warm = {}
    for name, step in steps.items():  # first steps: torch.compile compiles, allocators and caches settle
        t0 = time.perf_counter()
        step(), step()
        warm[name] = round(time.perf_counter() - t0, 1)
    wall: dict[str, list[float]] = {name: [] for name in names}
    cpu: dict[str, list[float]] = {name: [] for name in names}
    for _ in range(rounds):
        for name, step in steps.items():
            seconds, cpu_s, tokens = step()
            wall[name].append(tokens / seconds)
            cpu[name].append(tokens / cpu_s)
    ref, ref_cpu = wall[names[0]], cpu[names[0]]
    return {name: {"tokens_per_s": round(statistics.median(v), 1),
                   "ratio": round(statistics.median(a / b for a, b in zip(v, ref)), 3),
                   "tokens_per_cpu_s": round(statistics.median(cpu[name]), 1),
                   "cpu_ratio": round(statistics.median(a / b for a, b in zip(cpu[name], ref_cpu)), 3),
                   "first_two_steps_s": warm[name]} for name, v in wall.items()}  # fmt: skip


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


QUALITY = {"fp32": {"mixed_precision": "no"}, "bf16": {"mixed_precision": "bf16"}}  # loop overrides compared


def bench_quality(params: Path, data: Path, base: Path | None, stages: list[str]) -> dict:
    """Each QUALITY variant of each stage trained on the real windows in `data`, side by side (own processes)."""
    procs = {}
    for stage in stages:  # all at once, one torch thread each: the losses do not depend on the timing
        for name, over in QUALITY.items():
            cmd = [sys.executable, __file__, "--params", str(params), "--data", str(data),
                   "--quality-run", json.dumps({"stage": stage, "overrides": over})]  # fmt: skip
            cmd += ["--base", str(base)] if base is not None else []
            env = {**os.environ, "OMP_NUM_THREADS": "1"}
            procs[stage, name] = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    results: dict = {stage: {} for stage in stages}
    for (stage, name), proc in procs.items():
        stdout, stderr = proc.communicate(timeout=7200)
        lines = [line for line in stdout.splitlines() if line.startswith("{")]
        results[stage][name] = json.loads(lines[-1]) if proc.returncode == 0 and lines else {"error": stderr[-800:]}
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--params", type=Path, default=REPO / "params.yaml")
    parser.add_argument("--steps", type=int, default=12, help="optimizer steps per measurement")
    parser.add_argument("--skip", default="", help="comma list of: throughput, compare, memory, restart, quality")
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)  # internal: one memory variant
    parser.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, help="a tokenize stage's folder: also compare valid loss (quality)")
    parser.add_argument("--base", type=Path, help="base folder fine-tune quality starts from (a pretrain's base/)")
    parser.add_argument("--quality-stages", default="pretrain,finetune")
    parser.add_argument("--compare", default="", help=f"comma list of {', '.join(COMPARE)} (first = reference)")
    parser.add_argument("--rounds", type=int, default=8, help="interleaved steps per compare variant")
    parser.add_argument("--quality-run", help=argparse.SUPPRESS)  # internal: one quality variant
    args = parser.parse_args()
    if args.quality_run:
        spec = json.loads(args.quality_run)
        print(json.dumps(quality_run(args.data, spec["stage"], args.params, spec["overrides"], args.base)))
        return
    if args.variant:
        print(json.dumps(memory_variant(args.workdir, args.variant, args.steps)))
        return
    import torch

    skip = set(filter(None, args.skip.split(",")))
    with tempfile.TemporaryDirectory(prefix="jam-bench-train-") as tmp:
        root = make_workdir(Path(tmp), args.params, args.steps)
        result: dict = {"device": "cuda" if torch.cuda.is_available() else "cpu", "threads": torch.get_num_threads()}
        if "throughput" not in skip:
            result["pretrain"] = bench_loop(root, "pretrain")
            result["finetune_qlora"] = bench_loop(root, "finetune")
        if "compare" not in skip:
            names = args.compare.split(",") if args.compare else list(COMPARE)
            result["compare"] = {stage: bench_compare(root, stage, args.rounds, names) for stage in STAGES}
        if "memory" not in skip:
            result["memory"] = bench_memory(root, min(args.steps, 6))
        if "restart" not in skip:
            result["restart"] = bench_restart(root)
        if args.data is not None and "quality" not in skip:
            stages = args.quality_stages.split(",")
            result["quality"] = bench_quality(args.params, args.data.resolve(), args.base, stages)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
