"""Issue 12's headline through training: two machines that share only the services.

Machine A and machine B are two fresh clones of this repository in separate folders, each with its own `data/`,
each running its own checkout's code; they share nothing but the session's moto S3 (DVC remote, checkpoints,
MLflow artifacts) and the MLflow tracking server. A's data stages are pushed to the DVC remote as the flow does
after each stage; A fine-tunes with `checkpoint.dir` on S3 and is SIGKILLed (its whole process group) after a
checkpoint reached S3, then its folder is deleted. B pulls the data from the remote, resumes from A's checkpoint
and finishes: the adapter is the uninterrupted run's, and the tracking server holds one run with every step once.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from pipeline import datasync
from pipeline.core.config import Config, config_from_dict
from pipeline.core.files import read_json, sha256_file
from tests.conftest import BUCKET
from tests.pipeline.train.test_model import tiny_cfg, tiny_tree, write_base_bundle, write_token_data
from tests.pipeline.train.test_resume import ADAPTER, OVER, STEPS, _finish, _history, _launch, _prepare

REPO = Path(__file__).resolve().parents[1]
DATA_STAGES = ["tokenize", "pretrain"]  # what the fine-tune reads; A "ran" them (tiny stand-ins), B pulls them
UPSTREAM = ("clean", "split", "augment")  # tokenize's deps: `dvc commit` wants them to exist (empty here)


def _clone(dest: Path) -> Path:
    subprocess.run(["git", "clone", "--quiet", str(REPO), str(dest)], cwd=dest.parent, check=True, timeout=120)
    return dest


def _machine_cfg(services: Config, prefix: str) -> Config:
    """The tiny fine-tune on the spot profile: relative data dir (what dvc.yaml tracks), the tracking server, an
    experiment, DVC remote and checkpoint prefix of this test's own on the shared bucket."""
    tree = tiny_tree(Path("."), **OVER)
    tree["project"].update(name=f"spot-{prefix}", data_dir="data", mlflow_uri=services.project.mlflow_uri,
                           artifact_dir="mlruns/artifacts")  # fmt: skip
    tree["checkpoint"]["dir"] = f"{services.checkpoint.dir}/{prefix}"
    tree["services"] = services.services.model_dump(mode="json")
    tree["services"]["dvc_remote"] = f"{services.services.dvc_remote}/{prefix}"
    return config_from_dict(tree)


def _write_params(machine: Path, cfg: Config) -> None:
    (machine / "params.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json")))  # every key: dvc reads some


@pytest.fixture
def started():
    """Processes a test starts; whatever still runs when it ends (a failed assertion) is killed with its group."""
    procs: list[subprocess.Popen] = []
    yield procs
    for proc in procs:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):  # the reference is not a group leader
                os.killpg(proc.pid, signal.SIGKILL)
            proc.kill()
            proc.communicate(timeout=60)


def _start(machine: Path, started: list[subprocess.Popen]) -> subprocess.Popen:
    """`python -m pipeline.train --stage finetune` with the machine's own code, in a process group of its own."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "MLFLOW_DISABLE_TELEMETRY": "true", "TQDM_DISABLE": "1",
           "PYTHONPATH": str(machine)}  # fmt: skip
    cmd = [sys.executable, "-m", "pipeline.train", "--stage", "finetune", "-p", "params.yaml"]
    started.append(proc := subprocess.Popen(cmd, cwd=machine, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                            text=True, start_new_session=True))  # fmt: skip
    return proc


def _read_until(proc: subprocess.Popen, pattern: str) -> tuple[str, re.Match]:
    seen = []
    for line in proc.stderr:
        seen.append(line)
        if m := re.search(pattern, line):
            return "".join(seen), m
    raise AssertionError(f"exit {proc.wait()} before /{pattern}/:\n" + "".join(seen)[-3000:])


def _s3_checkpoints(cfg: Config) -> dict[int, dict]:
    """Step -> manifest of every complete fine-tune checkpoint under the test's prefix on S3."""
    import s3fs

    fs = s3fs.S3FileSystem()
    fs.invalidate_cache()
    root = cfg.checkpoint.dir.removeprefix("s3://")
    manifests = [k for k in fs.find(root) if k.endswith("/MANIFEST.json")]
    return {int(re.search(r"step-(\d+)/", k).group(1)): json.loads(fs.cat_file(k)) for k in manifests}


def _server_history(cfg: Config, run_id: str) -> dict[str, list[tuple[int, float]]]:
    from pipeline.registry.client import mlflow_client

    client = mlflow_client(cfg)
    return {key: sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))
            for key in ("train_loss", "valid_loss", "lr")}  # fmt: skip


def _machine_a(root: Path, cfg: Config) -> Path:
    """A clone whose data stages ran (the tiny stand-ins the training tests use) and were pushed, as the flow does."""
    machine = _clone(root)
    _write_params(machine, cfg)
    write_token_data(machine / "data")
    write_base_bundle(tiny_cfg(machine, **OVER), seed=0)  # the reference's base, byte for byte
    for name in UPSTREAM:
        (machine / "data" / name).mkdir()
    datasync.configure(cfg, machine)
    for stage in DATA_STAGES:
        datasync.push(cfg, stage, machine)
    return machine


def _check_tracking(cfg: Config, run_id_in_checkpoint: str, straight: Path, machine_b: Path) -> None:
    """One finished run on the server, the one A's checkpoint named; every step logged once, as the reference's."""
    from pipeline.registry.client import experiment_id, mlflow_client

    client = mlflow_client(cfg)
    runs = client.search_runs([experiment_id(client, cfg)])
    assert [r.info.run_id for r in runs] == [run_id_in_checkpoint]  # one run across both machines
    assert runs[0].info.status == "FINISHED" and runs[0].data.tags["jam.role"] == "finetune"
    assert read_json(machine_b / "data/finetune/style/report.json")["stats"]["run_id"] == run_id_in_checkpoint
    _, want = _history(straight)
    got = _server_history(cfg, run_id_in_checkpoint)
    for key, points in want.items():
        steps = [s for s, _ in got[key]]
        assert steps == sorted(set(steps)) == [s for s, _ in points], f"{key}: {steps}"
        assert torch.allclose(torch.tensor(got[key]), torch.tensor(points), atol=1e-6, rtol=0)
    assert [s for s, _ in got["train_loss"]] == list(range(1, STEPS + 1))
    assert [s for s, _ in got["valid_loss"]] == list(range(0, STEPS + 1, 4))
    assert "bundle" in {a.path for a in client.list_artifacts(run_id_in_checkpoint)}  # logged by B, through the server
    import s3fs

    keys = s3fs.S3FileSystem().find(f"{BUCKET}/mlflow/")
    assert any(f"{run_id_in_checkpoint}/artifacts/bundle/" in k for k in keys)


@pytest.mark.slow
@pytest.mark.spot
def test_machine_b_resumes_machine_a_fine_tune_from_the_shared_services(spot_services, tmp_path, started):
    cfg = _machine_cfg(spot_services[0], tmp_path.name)
    straight = tmp_path / "straight"  # the uninterrupted reference: local checkpoints, its own sqlite store
    _prepare(straight)
    started.append(reference := _launch(straight))  # runs beside machine A
    machine_a = _machine_a(tmp_path / "a", cfg)
    tokens_sha = sha256_file(machine_a / "data/tokenize/style/style/train.npy")

    proc_a = _start(machine_a, started)
    log_a, _ = _read_until(proc_a, rf"step 10/{STEPS}")
    os.killpg(proc_a.pid, signal.SIGKILL)  # the VM is reclaimed: every process of A at once, no warning
    killed = time.monotonic()
    log_a += proc_a.communicate(timeout=60)[1]
    assert proc_a.returncode == -signal.SIGKILL
    shutil.rmtree(machine_a)  # and its disk with it
    on_s3 = _s3_checkpoints(cfg)
    last = max(int(s) for s in re.findall(r"checkpoint step (\d+) -> s3://", log_a))
    assert 8 <= last < STEPS and max(on_s3) == last, (sorted(on_s3), log_a[-2000:])

    machine_b = _clone(tmp_path / "b")
    _write_params(machine_b, cfg)
    datasync.configure(cfg, machine_b)
    assert datasync.pull(cfg, [*UPSTREAM, *DATA_STAGES], machine_b) == DATA_STAGES  # upstream: never pushed
    assert sha256_file(machine_b / "data/tokenize/style/style/train.npy") == tokens_sha
    proc_b = _start(machine_b, started)
    log_b, resumed = _read_until(proc_b, r"resumed from step (\d+)")
    print(f"kill on A -> training resumed on B: {time.monotonic() - killed:.1f} s (clone, DVC pull, start, S3 fetch)")
    log_b += _finish(proc_b)
    assert int(resumed.group(1)) == last, log_b[-3000:]
    _finish(reference)

    want, got = load_file(straight / ADAPTER), load_file(machine_b / ADAPTER)
    assert want.keys() == got.keys() and want
    assert max(float((want[k] - got[k]).abs().max()) for k in want) <= 1e-6
    _check_tracking(cfg, on_s3[last]["meta"]["run_id"], straight, machine_b)  # the run id travelled in the checkpoint
