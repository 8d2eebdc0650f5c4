"""Wall time of the demo data flow, and of a no-change re-run as a fraction of the first. Prints JSON.

Runs `jam run --until STAGE` twice into a scratch data dir and MLflow store (the project's are untouched).
The second run includes Prefect's temporary server start (~6 s) and imports: a fixed cost.

    python bench/dataflow.py [--data-dir DIR] [--keep] [--until tokenize|promote]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def jam_run(data_dir: Path, extra: list[str], until: str) -> float:
    cmd = [str(Path(sys.executable).parent / "jam"), "run", "--no-dvc-commit", "--until", until]
    cmd += ["--set", f"project.data_dir={data_dir}", "--set", f"project.mlflow_uri=sqlite:///{data_dir}/mlflow.db"]
    cmd += ["--set", f"project.artifact_dir={data_dir}/artifacts"]
    cmd += [a for s in extra for a in ("--set", s)]
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=REPO, check=True, stdout=subprocess.DEVNULL, env={**os.environ, "TQDM_DISABLE": "1"})
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--data-dir", type=Path, default=None)
    ap.add_argument("--keep", action="store_true", help="keep the scratch data dir")
    ap.add_argument("--until", default="tokenize", help="last stage (promote: the whole flow, ~7 min)")
    args = ap.parse_args()
    data_dir = args.data_dir or Path(tempfile.mkdtemp(prefix="jam-bench-"))
    from pipeline.core.styles import DEFAULT_PLAYERS

    styles = {name: {"sources": [f"{data_dir}/demo/audio/{name}"]} for name in DEFAULT_PLAYERS}
    src = f"styles={json.dumps(styles)}"
    first = jam_run(data_dir, [src], args.until)
    second = jam_run(data_dir, [src], args.until)
    report = json.loads((data_dir / "transcribe" / "report.json").read_text())
    result = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "until": args.until,
        "first_run_s": round(first, 1),
        "no_change_rerun_s": round(second, 1),
        "rerun_fraction": round(second / first, 3),
        "rerun_transcribed": len(report["processed"]),
        "pieces": report["items_in"],
    }
    print(json.dumps(result, indent=2))
    if not args.keep and args.data_dir is None:
        shutil.rmtree(data_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
