"""The GPU profile (params-gpu.yaml) end to end at reduced steps; prints one JSON. Run it through bench/gpu.sh.

    bench/gpu.sh [--steps 60] [--data DIR] [--dry-run]

1. pretrain, then the QLoRA fine-tune (NF4 base, bf16 compute, 8-bit AdamW), each as `python -m pipeline.train`
   in its own process: tokens/s (median over logged steps after the first two, from MLflow) and peak memory
   (`peak_mem_mb`: torch.cuda.max_memory_allocated on CUDA, peak RSS on CPU);
2. evaluation (`jam stage evaluate`) when the data has the demo's split and clean pieces;
3. fine-tune memory on the same base: QLoRA NF4 vs LoRA on a bf16 base vs LoRA fp32 (bench/train.py's variants);
4. the jam runner's latency on the fine-tuned bundle (bench/latency.py: ms per generated id, p99), on CUDA there.
Data: `--data DIR` (a project data folder holding tokenize/, and split/ + clean/ for evaluation), else the
checkout's data/ when `jam run --until tokenize` has filled it, else synthetic windows (said so in the JSON).
`--dry-run`: the same steps on CPU with a tiny model and 2 steps (what the test runs; not a GPU figure).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
TARGET_FINETUNE_MB = 4096  # the research plan: the GPU profile's fine-tune in <= 4 GB
TINY = {"hidden_size": 64, "num_layers": 2, "num_heads": 2, "num_kv_heads": 1, "intermediate_size": 128}


def profile(root: Path, data: Path, steps: int, dry_run: bool) -> Path:
    """params-gpu.yaml with paths under `root`, `steps` optimizer steps, one style; tiny and on CPU for a dry run."""
    tree = yaml.safe_load((REPO / "params-gpu.yaml").read_text())
    tree["project"] = {**tree["project"], "data_dir": str(data), "mlflow_uri": f"sqlite:///{root}/mlflow.db",
                       "artifact_dir": str(root / "artifacts")}  # fmt: skip
    for section in ("pretrain", "finetune"):
        every = max(1, steps // 2)
        tree[section] |= {"max_steps": steps, "warmup_steps": 1, "eval_every": every, "system_metrics": False}
    tree["checkpoint"] = {**tree.get("checkpoint", {}), "every_steps": steps, "dir": str(root / "checkpoints")}
    tree["evaluate"] = {"n_prompts": 2, "seeds": [0], "n_tokens": 64}  # a short evaluation: it proves the path
    if dry_run:
        tree["model"] = {**tree["model"], **TINY}
        for section in ("pretrain", "finetune"):
            tree[section] |= {"batch_size": 4, "mixed_precision": "no"}
        tree["finetune"]["compute_dtype"] = "float32"
    path = root / "params.yaml"
    path.write_text(yaml.safe_dump(tree, sort_keys=False))
    return path


def prepare_data(root: Path, source: Path | None, styles: list[str], cfg) -> tuple[Path, str]:
    """The data folder training reads: a copy of `source` (the demo's), or synthetic windows."""
    data = root / "data"
    if source is not None and (source / "tokenize" / "report.json").is_file():
        for stage in ("tokenize", "split", "clean"):
            if (source / stage).is_dir():
                shutil.copytree(source / stage, data / stage, ignore=shutil.ignore_patterns("cache"))
        return data, f"demo ({source})"
    from bench.train import _windows
    from pipeline.data.tokenize import make_tokenizer
    from realtime.bundle_format import special_ids

    tok = data / "tokenize"
    tok.mkdir(parents=True)
    tokenizer = make_tokenizer(cfg.tokenize)  # untrained (no BPE): a real tokenizer file for the runner
    tokenizer.save(tok / "tokenizer.json")
    vocab, seq, ids = len(tokenizer), cfg.tokenize.max_seq_len, special_ids(tokenizer)
    for corpus in ["base", *(f"style/{s}" for s in styles)]:
        (tok / corpus).mkdir(parents=True, exist_ok=True)
        np.save(tok / corpus / "train.npy", _windows(256, seq, vocab, 0))
        np.save(tok / corpus / "valid.npy", _windows(32, seq, vocab, 1))
    stats = {"vocab_size": vocab, **ids, "kind": cfg.tokenize.kind, "max_seq_len": seq, "overlap": 0,
             "tokenizer_sha256": "0" * 64}  # fmt: skip
    (tok / "report.json").write_text(json.dumps({"stats": stats}))
    return data, "synthetic"


def run(cmd: list[str], timeout: int = 600) -> tuple[str, float]:
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "TQDM_DISABLE": "1"}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])}... failed ({proc.returncode}): {proc.stderr[-1500:]}")
    return proc.stdout, round(time.perf_counter() - t0, 1)


def training(params: Path, stage: str, cfg) -> dict:
    """One training stage in its own process: tokens/s (median after warm-up), peak memory, wall seconds."""
    from mlflow.tracking import MlflowClient

    _, seconds = run([sys.executable, "-m", "pipeline.train", "--stage", stage, "-p", str(params), "--fresh"])
    stats = json.loads((cfg.stage_dir(stage) / "report.json").read_text())["stats"]
    if stage == "finetune":
        stats = stats[next(iter(cfg.styles))]
    history = MlflowClient(cfg.project.mlflow_uri).get_metric_history(stats["run_id"], "tokens_per_s")
    speeds = [m.value for m in sorted(history, key=lambda m: m.step)]
    return {"tokens_per_s": round(statistics.median(speeds[2:] or speeds), 1), "peak_mem_mb": stats["peak_mem_mb"],
            "steps": stats["steps"], "train_loss": round(stats["train_loss"], 4), "wall_s": seconds}  # fmt: skip


def evaluation(params: Path, data: Path) -> dict:
    if not (data / "split" / "split.json").is_file():
        return {"skipped": "no split.json/clean pieces in the data (synthetic windows)"}
    _, seconds = run([sys.executable, "-m", "pipeline.cli", "stage", "evaluate", "-p", str(params)])
    report = json.loads((data / "evaluate" / "report.json").read_text())
    return {"wall_s": seconds, "stats": report.get("stats", {})}


def memory(params: Path, steps: int) -> dict:
    out, _ = run([sys.executable, str(REPO / "bench" / "train.py"), "--params", str(params), "--steps", str(steps),
                  "--skip", "throughput,gemm,attention,heap,compare,restart"])  # fmt: skip
    variants = json.loads(out[out.index("{") :])["memory"]
    key = "cuda_max_allocated_mb" if "cuda_max_allocated_mb" in variants["qlora_nf4"] else "peak_over_imports_mb"
    mb = {name: v.get(key) for name, v in variants.items()}
    ratio = round(mb["qlora_nf4"] / mb["lora_bf16"], 3) if mb["qlora_nf4"] and mb["lora_bf16"] else None
    return {"measure": key, "mb": mb, "qlora_over_lora_bf16": ratio, "variants": variants}


def latency(bundle: Path) -> dict:
    out, _ = run([sys.executable, str(REPO / "bench" / "latency.py"), "--model", str(bundle), "--mode",
                  "continuous", "--rounds", "10"])  # fmt: skip
    result = json.loads(out[out.index("{") :])
    return {"ms_per_id": result.get("ms_per_token"), "p99_ms": result.get("p99_ms"), "backend": result.get("backend")}


def device() -> dict:
    import torch

    info = {"torch": torch.__version__, "cuda": torch.cuda.is_available()}
    if torch.cuda.is_available():
        info |= {"gpu": torch.cuda.get_device_name(0), "cuda_version": torch.version.cuda,
                 "bf16": torch.cuda.is_bf16_supported()}  # fmt: skip
    return info


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=60, help="optimizer steps of pretrain and of the fine-tune")
    ap.add_argument("--data", type=Path, default=None, help="a data folder with tokenize/ (default: ./data)")
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny model, 2 steps: checks the script, no GPU")
    ap.add_argument("--keep", type=Path, default=None, help="keep the work folder here")
    args = ap.parse_args()
    for key, value in {"HF_HUB_OFFLINE": "1", "MLFLOW_DISABLE_TELEMETRY": "true", "DVC_NO_ANALYTICS": "1",
                       "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}.items():  # fmt: skip
        os.environ.setdefault(key, value)
    from bench.scratch import scratch_dir
    from pipeline.core.config import load_config

    steps = 2 if args.dry_run else args.steps
    with scratch_dir(args.keep, "jam-gpu-") as root:
        started = time.perf_counter()
        tree = yaml.safe_load((REPO / "params-gpu.yaml").read_text())
        defaults = load_config(REPO / "params.yaml")
        style = next(iter(defaults.styles))
        data, kind = prepare_data(root, args.data or REPO / "data", [style], defaults)
        params = profile(root, data, steps, args.dry_run)
        tree = yaml.safe_load(params.read_text())
        tree["styles"] = {style: defaults.styles[style].model_dump(mode="json")}  # one style: half the time
        params.write_text(yaml.safe_dump(tree, sort_keys=False))
        cfg = load_config(params)
        result = {
            "dry_run": args.dry_run,
            "device": device(),
            "data": kind,
            "steps": steps,
            "style": style,
            "pretrain": training(params, "pretrain", cfg),
            "finetune_qlora": training(params, "finetune", cfg),
        }
        result["evaluate"] = evaluation(params, data)
        result["finetune_memory"] = memory(params, min(steps, 6))
        qlora = result["finetune_qlora"]["peak_mem_mb"]
        result["finetune_within_4gb"] = qlora <= TARGET_FINETUNE_MB if result["device"]["cuda"] else None
        result["latency"] = latency(cfg.stage_dir("finetune") / "bundle")
        result["wall_s"] = round(time.perf_counter() - started, 1)
        print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
