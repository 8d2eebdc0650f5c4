"""Jam-runner latency on simulated input; prints JSON (same code as `jam bench latency`).

    python bench/latency.py                      # random demo-size model (hidden 192, 4 layers, vocab 1024)
    python bench/latency.py --model path/to/bundle --mode continuous --rounds 50 --e2e
    python bench/latency.py --model data/finetune/bundle --mode continuous --input data/clean/style/<piece>.mid

Speed targets live here, not in tests (issue 9; demo-size model, 1 torch thread, 2 CPU cores): <= 0.5 ms per
generated id; p99 <= 20 ms continuous and <= 10 ms call-and-response; RTF >= 50 at real piano id density.
The forward's alternatives side by side: bench/backends.py.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

from realtime.benchmark import run_benchmark
from realtime.settings import JamSettings

TARGETS = {"ms_per_token": 0.5, "p99_ms": {"continuous": 20.0, "call_response": 10.0}, "rtf": 50.0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="random", help="bundle folder, models:/name@alias, or 'random'")
    ap.add_argument("--tracking-uri", default="sqlite:///mlruns/mlflow.db")
    ap.add_argument("--mode", default="call_response", choices=["call_response", "continuous"])
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--hidden", type=int, default=192)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=6)
    ap.add_argument("--kv-heads", type=int, default=None)
    ap.add_argument("--vocab", type=int, default=1024)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--quantization", default="none")
    ap.add_argument("--e2e", action="store_true", help="also a real-time session with a file as the human")
    ap.add_argument("--input", type=Path, default=None, help="a MIDI performance as the human")
    args = ap.parse_args()
    settings = JamSettings(
        tracking_uri=args.tracking_uri, mode=args.mode, threads=args.threads, dtype=args.dtype,
        quantization=args.quantization, transport="memory", seed=0, input_file=args.input,
    )  # fmt: skip
    size = {"hidden": args.hidden, "layers": args.layers, "heads": args.heads, "kv_heads": args.kv_heads,
            "vocab": args.vocab}  # fmt: skip
    model = None if args.model == "random" else args.model
    result = run_benchmark(settings, model=model, size=size, rounds=args.rounds, e2e=args.e2e)
    eng = result["engine"]
    rtf = eng.get("rtf_at_real_density") or 0.0  # not the random model's own RTF: its output is unrealistically sparse
    p99 = result["p99_ms"] if result["p99_ms"] is not None else float("inf")
    per_id = result["ms_per_token"] or float("inf")
    result["meets_targets"] = {
        "ms_per_token": per_id <= TARGETS["ms_per_token"],
        "p99_ms": p99 <= TARGETS["p99_ms"][args.mode],
        "rtf_at_real_density": rtf >= TARGETS["rtf"],
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
