"""Two training processes (torchrun, gloo on CPU) follow one process with the same global batch, and resume."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.pipeline.train.test_model import tiny_cfg, write_base_bundle, write_params, write_token_data

REPO = Path(__file__).resolve().parents[3]
STEPS = 8
ADAPTER = Path("data/finetune/bundle/adapters/style/adapter_model.safetensors")
TORCHRUN = Path(sys.executable).with_name("torchrun")


def _root(tmp_path: Path, name: str, batch_size: int) -> Path:
    """A project folder with token data and params; `batch_size` per process (global = x processes)."""
    # fp32: in bf16 a half batch's products round differently from the full batch's (adapters 4.4e-4 apart)
    loop = {"max_steps": STEPS, "eval_every": 4, "batch_size": batch_size, "mixed_precision": "no"}
    over = {"pretrain": loop, "finetune": {**loop, "lora_dropout": 0.0}, "checkpoint": {"every_steps": 4}}
    root = tmp_path / name
    root.mkdir()
    write_token_data(root / "data")
    write_base_bundle(tiny_cfg(root, **over), seed=0)
    write_params(root, **over)
    return root


def _launch(root: Path, stage: str, processes: int) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    entry = ["-m", "pipeline.train", "--stage", stage, "-p", "params.yaml"]
    if processes == 1:
        cmd = [sys.executable, *entry]
    else:  # a free loopback port: parallel test runs must not meet in one rendezvous
        port = ["--master_addr", "127.0.0.1", "--master_port", str(_free_port())]
        cmd = [str(TORCHRUN), "--nproc_per_node", str(processes), *port, *entry]
    return subprocess.Popen(cmd, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _finish(proc: subprocess.Popen) -> str:
    out, _ = proc.communicate(timeout=240)
    assert proc.returncode == 0, out[-3000:]
    return out


def _history(root: Path) -> list[list[tuple[int, float]]]:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{root}/mlruns/mlflow.db")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()], order_by=["start_time"])
    return [sorted((m.step, m.value) for m in client.get_metric_history(r.info.run_id, "train_loss")) for r in runs]


def _worker_pid(agent: subprocess.Popen, rank: int) -> int:
    """The pid of torchrun's worker with RANK=`rank`."""
    for _ in range(100):
        children = subprocess.run(["pgrep", "-P", str(agent.pid)], capture_output=True, text=True).stdout.split()
        for pid in children:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            if f"RANK={rank}".encode() in environ:
                return int(pid)
        time.sleep(0.1)
    raise AssertionError(f"no worker of rank {rank}")


@pytest.mark.slow
def test_two_processes_match_one_and_resume_after_a_worker_is_killed(tmp_path):
    if not TORCHRUN.exists():
        pytest.skip("torchrun not installed beside this python")
    one, two = _root(tmp_path, "one", batch_size=4), _root(tmp_path, "two", batch_size=2)
    # fine-tune first, on the same (written) base: a pretrained base differing in float noise would quantize
    # (NF4) to different bins, which alone moves the loss by ~1e-4
    log = ""
    for stage in ("finetune", "pretrain"):
        _finish(_launch(one, stage, 1))
        log += _finish(_launch(two, stage, 2))
    assert log.count("checkpoint step 4 ->") == 2  # once per stage, written by the main process only

    # the same curves: one MLflow run per stage, every step once, losses equal to float noise
    hist_one, hist_two = _history(one), _history(two)
    assert len(hist_two) == 2 and [len(h) for h in hist_two] == [STEPS, STEPS]
    for a, b in zip(hist_one, hist_two, strict=True):
        assert [s for s, _ in a] == [s for s, _ in b]
        assert torch.allclose(torch.tensor(a), torch.tensor(b), atol=1e-4, rtol=0)
    a, b = load_file(one / ADAPTER), load_file(two / ADAPTER)
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-4

    # SIGKILL the non-main worker after a checkpoint: torchrun stops the other; the same command resumes exactly
    broken = _root(tmp_path, "broken", batch_size=2)
    agent = _launch(broken, "finetune", 2)
    seen = []
    for line in agent.stdout:
        seen.append(line)
        if re.search(r"step 6/", line):
            os.kill(_worker_pid(agent, 1), signal.SIGKILL)
            break
    out, _ = agent.communicate(timeout=300)
    assert agent.returncode != 0, "".join(seen) + out
    log = _finish(_launch(broken, "finetune", 2))
    assert "resumed from step 4" in log
    a, b = load_file(two / ADAPTER), load_file(broken / ADAPTER)  # `two` is the uninterrupted 2-process run
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-6
    assert [len(h) for h in _history(broken)] == [STEPS]  # one fine-tune run, its steps logged once
