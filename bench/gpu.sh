#!/usr/bin/env bash
# The GPU profile proven: params-gpu.yaml end to end at reduced steps on CUDA (pretrain, QLoRA fine-tune with NF4,
# bf16 and 8-bit AdamW, evaluation, the runner's latency); prints one JSON (bench/gpu.py says what is in it).
#
#   bench/gpu.sh [--steps 60] [--data DIR] [--dry-run]      # ~3-8 min on one GPU at 60 steps
#
# Python: $PYTHON, else .venv/bin/python when it has torch, else python3. The machine's own torch is used as it is
# (a CUDA build preinstalled, e.g. Python 3.12 + torch + transformers + peft + accelerate): this script never
# installs or replaces torch. The project runs from source on PYTHONPATH (so requires-python does not apply);
# whatever else it imports and the machine lacks is installed with pip: from wheels brought along with
# WHEELS=/path/to/wheels (offline: `pip download -d wheels bitsandbytes miditok symusic ...` on a machine with
# network), else from the package index. --dry-run: CPU, tiny model, 2 steps (checks the script; not a GPU figure).
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
export HF_HUB_OFFLINE=1 MLFLOW_DISABLE_TELEMETRY=true PREFECT_SERVER_ANALYTICS_ENABLED=false DVC_NO_ANALYTICS=1
export TOKENIZERS_PARALLELISM=false PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"

dry_run=0; for arg in "$@"; do [ "$arg" = --dry-run ] && dry_run=1; done
cuda='import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'
if [ -z "${PYTHON:-}" ]; then  # .venv's torch is the project's CPU build: only when it sees CUDA (or for --dry-run)
  if [ -x .venv/bin/python ] && { .venv/bin/python -c "$cuda" 2>/dev/null || { [ $dry_run = 1 ] && .venv/bin/python -c 'import torch' 2>/dev/null; }; }
  then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
"$PYTHON" -c 'import torch' 2>/dev/null || { echo "gpu.sh: $PYTHON has no torch (install a CUDA build first)" >&2; exit 2; }
if [ $dry_run = 0 ] && ! "$PYTHON" -c "$cuda" 2>/dev/null; then
  echo "gpu.sh: $PYTHON's torch sees no CUDA device (set PYTHON=...; --dry-run checks the script on CPU)" >&2; exit 2
fi

# import name -> pip name, for what the training, evaluation and latency paths import
missing=$("$PYTHON" - <<'PY'
import importlib.util
need = {"transformers": "transformers", "peft": "peft", "accelerate": "accelerate", "bitsandbytes": "bitsandbytes",
        "miditok": "miditok", "symusic": "symusic", "mlflow": "mlflow", "pydantic": "pydantic", "yaml": "pyyaml",
        "fsspec": "fsspec", "mido": "mido", "pretty_midi": "pretty_midi", "matplotlib": "matplotlib",
        "sklearn": "scikit-learn", "scipy": "scipy", "psutil": "psutil", "typer": "typer", "tqdm": "tqdm"}
print(" ".join(pip for mod, pip in need.items() if importlib.util.find_spec(mod) is None))
PY
)
if [ -n "$missing" ]; then
  torch_pin="torch==$("$PYTHON" -c 'import torch; print(torch.__version__)')"
  echo "gpu.sh: installing $missing (keeping $torch_pin)" >&2
  constraint=$(mktemp); echo "$torch_pin" > "$constraint"
  if [ -n "${WHEELS:-}" ]; then
    "$PYTHON" -m pip install -q --no-index --find-links "$WHEELS" -c "$constraint" $missing
  else
    "$PYTHON" -m pip install -q -c "$constraint" $missing
  fi
  rm -f "$constraint"
fi
exec timeout 600 "$PYTHON" bench/gpu.py "$@"
