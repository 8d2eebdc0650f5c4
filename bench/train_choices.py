"""The training loop's alternatives side by side, for `bench/train.py` (`compare` and `quality` sections)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from subprocess import PIPE

STAGES = ("pretrain", "finetune")
MAIN = Path(__file__).with_name("train.py")  # runs one quality variant per process (--quality-run)

# Side by side, interleaved step by step (the machine is shared: ratios to "fp32" are the figures to read; with one
# torch thread, `cpu_ratio` (tokens per CPU second) is the least disturbed by other processes).
# Each starts from the loop before pipeline/train/compute.py: fp32 on torch's matmul (MKL), attention mask passed,
# AdamW foreach, torch's dropout, default threads, eager. A "loop" entry instead takes the loop's own set-up
# (`compute.configure` with those loop keys, `dataset.model_inputs`): "loop_bf16" is its default where the CPU
# computes bf16, "loop_fp32" where it does not (its float32 oneDNN route does not compile: inductor's lowering of
# `mkldnn._linear_pointwise` asserts on its training graph).
COMPARE = {
    "fp32": {},
    "fp32_no_mask": {"mask": False},
    "bf16": {"bf16": True},
    "bf16_no_mask": {"bf16": True, "mask": False},
    "bf16_fused_adamw": {"bf16": True, "fused": True},
    "fp32_compile": {"compile": True},
    "bf16_compile": {"bf16": True, "compile": True},
    "bf16_1_thread": {"bf16": True, "threads": 1},
    "bf16_batch_x2": {"bf16": True, "batch": 2},
    "loop_fp32": {"loop": {"mixed_precision": "no"}},
    "loop_bf16": {"bf16": True, "loop": {"mixed_precision": "bf16"}},
    "loop_bf16_fp32_attention": {"bf16": True, "loop": {"mixed_precision": "bf16", "cpu_attention": "float32"}},
    "loop_bf16_sdpa": {"bf16": True, "loop": {"mixed_precision": "bf16", "cpu_attention": "sdpa"}},
    "loop_bf16_fp32_head": {"bf16": True, "loop": {"mixed_precision": "bf16", "fp32_head": True}},
    "loop_bf16_compile": {"bf16": True, "compile": True, "loop": {"mixed_precision": "bf16"}},
    "loop_bf16_compile_regions": {"bf16": True, "compile": "regions", "loop": {"mixed_precision": "bf16"}},
}


def _compare_step(root: Path, stage: str, spec: dict):
    """A closure training one step of `stage` as `spec` says; returns (seconds, non-pad tokens) per call."""
    import contextlib

    import torch

    from pipeline.core.config import load_config
    from pipeline.core.training import LoopConfig
    from pipeline.train.compute import configure
    from pipeline.train.dataset import Batches, TokenWindows, model_inputs
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
    if "loop" in spec:
        inputs = model_inputs
        configure(model, LoopConfig(**spec["loop"]), spec["loop"]["mixed_precision"], torch.device("cpu"))
    else:
        inputs = _no_mask if spec.get("mask", True) is False else lambda batch: batch
    params = [p for p in model.parameters() if p.requires_grad]
    fused = {"fused": True} if spec.get("fused") else {"foreach": True}
    opt = torch.optim.AdamW(params, lr=loop.lr, betas=(0.9, 0.95), weight_decay=loop.weight_decay, **fused)
    if spec.get("compile") == "regions":  # accelerate's regional compilation: each repeated block compiled once
        from accelerate.utils import compile_regions

        forward = compile_regions(model)
    else:
        forward = torch.compile(model) if spec.get("compile") else model
    data = Batches(TokenWindows(corpus / "train.npy", 0), loop.batch_size * spec.get("batch", 1), cfg.project.seed)
    threads, position = spec.get("threads") or torch.get_num_threads(), [0]

    def step() -> tuple[float, int]:
        batch = data.get(0, position[0] % data.per_epoch)
        position[0] += 1
        tokens = int(batch["attention_mask"].sum())
        batch = inputs(batch)
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


def _no_mask(batch: dict) -> dict:
    return {k: v for k, v in batch.items() if k != "attention_mask"}


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

    def ratio(v: list[float], ref: list[float]) -> float:
        return round(statistics.median(a / b for a, b in zip(v, ref, strict=True)), 3)

    ref, ref_cpu = wall[names[0]], cpu[names[0]]
    return {name: {"tokens_per_s": round(statistics.median(wall[name]), 1), "ratio": ratio(wall[name], ref),
                   "tokens_per_cpu_s": round(statistics.median(cpu[name]), 1), "cpu_ratio": ratio(cpu[name], ref_cpu),
                   "first_two_steps_s": warm[name]} for name in names}  # fmt: skip


def quality_run(
    tok_dir: Path, stage: str, params: Path, overrides: dict, base_dir: Path | None, seed: int | None = None
) -> dict:
    """One real training of `stage` on a tokenize stage's windows (`tok_dir`) with `overrides` of its loop section
    (and `seed` in place of the params' `project.seed`).

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
    if seed is not None:
        cfg = cfg.model_copy(update={"project": cfg.project.model_copy(update={"seed": seed})})
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
            print(json.dumps({"progress": curve[-1]}), flush=True)  # a long run's partial curve

    with tempfile.TemporaryDirectory(prefix="jam-bench-quality-") as tmp:
        job = TrainJob(build, TokenWindows(corpus / "train.npy", vocab.pad_id),
                       TokenWindows(corpus / "valid.npy", vocab.pad_id), loop, CheckpointStore(Path(tmp), keep=1),
                       cfg.project.seed, "bench", every_steps=loop.max_steps, every_s=1e9,
                       adapter_only=stage == "finetune", on_step=on_step)  # fmt: skip
        t0 = time.perf_counter()
        result = fit(job)
        seconds = time.perf_counter() - t0
    final = evaluate(result.model, job.valid_ds, result.accelerator, loop.batch_size)  # fit's model runs in fp32
    return {"valid_loss": curve, "final_valid_loss_fp32": round(final, 4), "corpus": corpus.name,
            "tokens_per_s": round(statistics.median(speeds[2:] or speeds), 1), "train_s": round(seconds, 1),
            "threads": torch.get_num_threads()}  # fmt: skip


# loop overrides compared: "bf16" is torch's autocast as is (attention in its bf16 kernel, head in bf16),
# "bf16_matmul" the loop's default (attention through bf16 products), "bf16_fp32" attention and head in float32;
# "fp32" takes `cpu_gemm: auto`, "fp32_mkl" torch's own matmul
QUALITY = {
    "fp32": {"mixed_precision": "no"},
    "fp32_mkl": {"mixed_precision": "no", "cpu_gemm": "mkl"},
    "bf16": {"mixed_precision": "bf16", "cpu_attention": "sdpa", "fp32_head": False},
    "bf16_matmul": {"mixed_precision": "bf16", "cpu_attention": "matmul", "fp32_head": False},
    "bf16_fp32_attention": {"mixed_precision": "bf16", "cpu_attention": "float32", "fp32_head": False},
    "bf16_fp32": {"mixed_precision": "bf16", "cpu_attention": "float32", "fp32_head": True},
}


def bench_quality(
    params: Path, data: Path, base: Path | None, stages: list[str], names: list[str], seeds: list[int], jobs: int
) -> dict:
    """Each QUALITY variant in `names` of each stage trained on the real windows in `data` once per seed.

    Runs `jobs` trainings at a time, one torch thread each (the losses do not depend on the timing). A training's
    end is chaotic in small perturbations (float rounding moves it as much as another seed may), so a variant is
    judged by its mean over seeds against the reference's (the first name), paired by seed.
    """
    runs = [(stage, name, seed) for seed in seeds for stage in stages for name in names]
    results: dict = {stage: {name: {} for name in names} for stage in stages}
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    pending, active = list(runs), {}
    while pending or active:
        while pending and len(active) < jobs:
            stage, name, seed = key = pending.pop(0)
            spec = {"stage": stage, "overrides": QUALITY[name], "seed": seed}
            cmd = [sys.executable, str(MAIN), "--params", str(params), "--data", str(data),
                   "--quality-run", json.dumps(spec)]  # fmt: skip
            cmd += ["--base", str(base)] if base is not None else []
            active[key] = subprocess.Popen(cmd, stdout=PIPE, stderr=PIPE, text=True, env=env)
        done = [k for k, proc in active.items() if proc.poll() is not None]
        if not done:
            time.sleep(1.0)
        for key in done:
            proc = active.pop(key)
            stdout, stderr = proc.communicate()
            lines = [line for line in stdout.splitlines() if line.startswith("{")]
            ok = proc.returncode == 0 and lines
            results[key[0]][key[1]][str(key[2])] = json.loads(lines[-1]) if ok else {"error": stderr[-800:]}
    return {stage: _quality_summary(by_name, names) for stage, by_name in results.items()}


def _quality_summary(by_name: dict, names: list[str]) -> dict:
    """Per variant: the final valid loss per seed, its mean and spread, and the mean relative difference to the
    reference (first name) over the seeds both finished, with that difference's standard error."""
    final = {name: {seed: r["final_valid_loss_fp32"] for seed, r in runs.items() if "error" not in r}
             for name, runs in by_name.items()}  # fmt: skip
    ref = final[names[0]]
    out = {}
    for name in names:
        losses = final[name]
        row = {"runs": by_name[name], "final_valid_loss": losses}
        if losses:
            row["mean"] = round(statistics.fmean(losses.values()), 4)
            row["stdev"] = round(statistics.stdev(losses.values()), 4) if len(losses) > 1 else None
        paired = [losses[s] / ref[s] - 1 for s in losses if s in ref]
        if name != names[0] and paired:
            row["mean_rel_diff"] = round(statistics.fmean(paired), 4)
            row["rel_diff_stderr"] = (
                round(statistics.stdev(paired) / len(paired) ** 0.5, 4) if len(paired) > 1 else None
            )
        out[name] = row
    return out


def _stage_speed(root: Path, stage: str, processes: int, batch_size: int) -> float:
    """Median tokens/s (all processes) of one `python -m pipeline.train --stage` run after its first two steps."""
    env = {**os.environ, "PYTHONPATH": str(MAIN.parents[1]), "TQDM_DISABLE": "1"}
    entry = ["-m", "pipeline.train", "--stage", stage, "-p", "params.yaml", "--fresh",
             "--set", f"{stage}.batch_size={batch_size}", "--set", f"{stage}.system_metrics=false"]  # fmt: skip
    if processes == 1:
        cmd = [sys.executable, *entry]
    else:  # one thread per process; gloo on loopback
        env["OMP_NUM_THREADS"] = "1"
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        torchrun = Path(sys.executable).with_name("torchrun")
        cmd = [str(torchrun), "--nproc_per_node", str(processes), "--master_addr", "127.0.0.1",
               "--master_port", str(port), *entry]  # fmt: skip
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(f"{stage} x{processes}: {(proc.stdout + proc.stderr)[-1500:]}")
    speeds = [float(m) for m in re.findall(r"tokens_per_s ([\d.e+]+)", proc.stdout + proc.stderr)]
    return statistics.median(speeds[2:] or speeds)


def bench_processes(root: Path, stages: list[str], rounds: int, processes: int) -> dict:
    """One process on every core vs `processes` torchrun processes of one thread each, the same global batch.

    Whole `python -m pipeline.train` runs of the params' steps, alternating for `rounds` rounds; the ratio is per
    round (the machine is shared). Two processes follow one process's curve to float noise
    (tests/pipeline/train/test_multiprocess.py).
    """
    from pipeline.core.config import load_config

    cfg = load_config(root / "params.yaml")
    out = {}
    for stage in stages:
        batch = getattr(cfg, stage).batch_size
        if batch % processes:
            raise ValueError(f"{stage}.batch_size {batch} is not a multiple of {processes} processes")
        one, many = [], []
        for _ in range(rounds):
            one.append(_stage_speed(root, stage, 1, batch))
            many.append(_stage_speed(root, stage, processes, batch // processes))
        out[stage] = {"one_process_tokens_per_s": [round(v) for v in one],
                      f"{processes}_processes_tokens_per_s": [round(v) for v in many],
                      "ratio": round(statistics.median(b / a for a, b in zip(one, many, strict=True)), 3)}  # fmt: skip
    return out


def bench_gemm(rows: int, shapes: dict[str, tuple[int, int]], rounds: int) -> dict:
    """A training step's float32 products at the demo's shapes, torch's matmul (MKL) against `compute._Projection`'s
    oneDNN route, interleaved: forward x @ W.T, the input's gradient g @ W, the weight's g.T @ x (GFLOP/s, medians)."""
    import torch

    out = {}
    for name, (n_in, n_out) in shapes.items():
        calls = _products(torch.randn(rows, n_in), torch.randn(n_out, n_in), torch.randn(rows, n_out))
        times: dict[str, list[float]] = {key: [] for key in calls}
        for call in calls.values():
            call()
        for _ in range(rounds):
            for key, call in calls.items():
                t0 = time.perf_counter()
                call()
                times[key].append(time.perf_counter() - t0)
        flop = 2 * rows * n_in * n_out
        out[name] = {key: round(flop / statistics.median(ts) / 1e9, 1) for key, ts in times.items()}
    return out


def _products(x, w, g) -> dict:
    import torch

    from pipeline.train.compute import _mkldnn_linear

    return {
        "forward_mkl": lambda: torch.nn.functional.linear(x, w),
        "forward_onednn": lambda: _mkldnn_linear(x, w, None),
        "input_grad_mkl": lambda: torch.mm(g, w),
        "input_grad_onednn": lambda: _mkldnn_linear(g, w.t(), None),
        "weight_grad_mkl": lambda: torch.mm(g.t(), x),
    }


def bench_attention(batch: int, heads: int, length: int, dim: int, rounds: int) -> dict:
    """One causal attention's forward + backward (ms, medians, interleaved) at a training batch's shape, as each
    `cpu_attention` computes it under autocast: torch's SDPA kernel in float32 and in bf16, `matmul_attention` in bf16;
    with each one's largest difference from float32 SDPA's output."""
    import torch
    import torch.nn.functional as F

    from pipeline.train.compute import kept_heap, matmul_attention

    gen = torch.Generator().manual_seed(0)
    qkv = [torch.randn(batch, heads, length, dim, generator=gen) for _ in range(3)]
    kinds = {
        "float32": (torch.float32, lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True)),
        "sdpa": (torch.bfloat16, lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True)),
        "matmul": (torch.bfloat16, lambda q, k, v: matmul_attention(q, k, v, None, dim**-0.5).transpose(1, 2)),
    }

    def run(dtype, fn):
        q, k, v = (t.to(dtype).requires_grad_() for t in qkv)
        t0 = time.perf_counter()
        out = fn(q, k, v)
        out.backward(torch.ones_like(out))
        return time.perf_counter() - t0, out.detach().float()

    times: dict[str, list[float]] = {kind: [] for kind in kinds}
    with kept_heap(torch.device("cpu")):  # as the loop trains (without it the scores' pages fault in every call)
        outputs = {kind: run(*spec)[1] for kind, spec in kinds.items()}  # first calls: allocations settle
        for _ in range(rounds):
            for kind, spec in kinds.items():
                times[kind].append(run(*spec)[0])
    ref = outputs["float32"]
    return {kind: {"ms": round(statistics.median(ts) * 1e3, 2),
                   "max_abs_diff": round(float((outputs[kind] - ref).abs().max()), 4)}
            for kind, ts in times.items()}  # fmt: skip


def heap_run(root: Path, kept: bool, rounds: int) -> dict:
    """Median tokens/s of the loop's step ("loop_bf16") in each stage, in this process, with `kept_heap` or not."""
    import torch

    from pipeline.train.compute import kept_heap

    out = {}
    with kept_heap(torch.device("cpu")) if kept else contextlib.nullcontext():
        for stage in STAGES:
            step = _compare_step(root, stage, COMPARE["loop_bf16"])
            step(), step()
            out[stage] = statistics.median(tokens / seconds for seconds, _, tokens in (step() for _ in range(rounds)))
    return out


def bench_heap(root: Path, rounds: int, repeats: int = 3) -> dict:
    """The loop's step with glibc's heap kept between steps (`compute.kept_heap`, as `fit` trains) against glibc's
    defaults: the allocator's state is the process's, so each side runs in its own processes, alternating."""
    runs: dict[str, list[dict]] = {"default": [], "kept": []}
    for _ in range(repeats):
        for name in runs:
            cmd = [sys.executable, str(MAIN), "--workdir", str(root), "--rounds", str(rounds),
                   "--heap-run", str(int(name == "kept"))]  # fmt: skip
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            runs[name].append(json.loads(out[out.index("{") :]))
    result = {}
    for stage in STAGES:
        default, kept = ([r[stage] for r in runs[name]] for name in ("default", "kept"))
        ratios = [k / d for k, d in zip(kept, default, strict=True)]
        result[stage] = {"tokens_per_s_default": round(statistics.median(default), 1),
                         "tokens_per_s_kept": round(statistics.median(kept), 1),
                         "ratio": round(statistics.median(ratios), 3)}  # fmt: skip
    return result
