"""bench/gpu.sh --dry-run: the GPU profile's script end to end on CPU (tiny model, 2 steps); its JSON's keys.

No GPU here: this proves the script's path (dependencies found, training, memory variants, latency), not a GPU figure.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow  # five Python processes with torch (~2-4 min on 2 shared cores)
def test_gpu_script_dry_run_prints_every_figure(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable}
    cmd = ["bash", str(REPO / "bench" / "gpu.sh"), "--dry-run", "--data", str(tmp_path / "none")]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout)
    assert result["dry_run"] is True and result["data"] == "synthetic" and result["steps"] == 2
    for stage in ("pretrain", "finetune_qlora"):
        assert result[stage]["tokens_per_s"] > 0 and result[stage]["peak_mem_mb"] > 0 and result[stage]["steps"] == 2
    memory = result["finetune_memory"]
    assert set(memory["mb"]) == {"qlora_nf4", "lora_fp32", "lora_bf16"} and all(memory["mb"].values())
    assert memory["qlora_over_lora_bf16"] > 0
    assert result["latency"]["ms_per_id"] > 0 and result["latency"]["p99_ms"] is not None
    assert "skipped" in result["evaluate"]  # synthetic windows have no held-out pieces to prompt with
    assert result["finetune_within_4gb"] is None  # only judged on CUDA
    assert result["device"]["cuda"] is False


def test_gpu_script_refuses_a_torch_without_cuda(tmp_path):
    if _cuda():
        pytest.skip("a CUDA device is visible: the script would run for real")
    env = {**os.environ, "PYTHON": sys.executable}
    proc = subprocess.run(["bash", str(REPO / "bench" / "gpu.sh")], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 2 and "sees no CUDA device" in proc.stderr and proc.stdout == ""


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()
