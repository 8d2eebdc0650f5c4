"""Spot safety: real processes stopped by SIGTERM and SIGKILL resume to exactly the uninterrupted result."""

from __future__ import annotations

import errno
import json
import os
import pickle
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pipeline.core.constants import EXIT_PREEMPTED
from tests.pipeline.train.test_checkpoint import moto_s3
from tests.pipeline.train.test_model import tiny_cfg, write_params, write_project, write_token_data

REPO = Path(__file__).resolve().parents[3]
STEPS = 16  # optimizer steps; checkpoints every 4
OVER = {"finetune": {"max_steps": STEPS, "eval_every": 4}, "checkpoint": {"every_steps": 4}}
ADAPTER = Path("data/finetune/bundle/adapters/style/adapter_model.safetensors")


def _launch(root: Path) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "MLFLOW_DISABLE_TELEMETRY": "true", "TQDM_DISABLE": "1",
           "PYTHONPATH": str(REPO)}  # fmt: skip
    cmd = [sys.executable, "-m", "pipeline.train", "--stage", "finetune", "-p", "params.yaml"]
    return subprocess.Popen(cmd, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _signal_at(proc: subprocess.Popen, pattern: str, sig: int) -> tuple[int, str]:
    """Read the child's log until a line matches `pattern`, send `sig`, then collect the rest."""
    seen = []
    for line in proc.stderr:
        seen.append(line)
        if re.search(pattern, line):
            proc.send_signal(sig)
            break
    _, rest = proc.communicate(timeout=300)
    return proc.returncode, "".join(seen) + rest


def _finish(proc: subprocess.Popen) -> str:
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    return out + err


def _history(root: Path) -> tuple[list, dict[str, list[tuple[int, float]]]]:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{root}/mlruns/mlflow.db")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    hist = {
        key: sorted((m.step, m.value) for m in client.get_metric_history(runs[0].info.run_id, key))
        for key in ("train_loss", "valid_loss", "lr")
    }
    return runs, hist


def test_sigterm_and_sigkill_resume_exactly(tmp_path):
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    write_project(straight, **OVER)
    write_project(broken, **OVER)
    reference = _launch(straight)  # runs beside the interrupted chain

    rc, log = _signal_at(_launch(broken), rf"step 3/{STEPS}", signal.SIGTERM)
    assert rc == EXIT_PREEMPTED, log[-3000:]
    stopped = int(re.search(r"preempted at step (\d+)", log).group(1))
    assert 3 <= stopped < 8

    rc, log = _signal_at(_launch(broken), rf"step 10/{STEPS}", signal.SIGKILL)
    assert rc == -signal.SIGKILL
    assert f"resumed from step {stopped}" in log and "checkpoint step 8" in log

    log = _finish(_launch(broken))
    assert "resumed from step 8" in log  # steps 9-10 died with the kill and are trained again
    _finish(reference)

    a, b = load_file(straight / ADAPTER), load_file(broken / ADAPTER)
    assert a.keys() == b.keys() and a
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-6

    _, hist_a = _history(straight)
    runs_b, hist_b = _history(broken)
    assert len(runs_b) == 1 and runs_b[0].info.status == "FINISHED"  # one MLflow run across three processes
    assert runs_b[0].data.tags["jam.role"] == "finetune"
    for key in hist_a:
        steps = [s for s, _ in hist_b[key]]
        assert steps == sorted(set(steps)), f"{key}: duplicate points {steps}"
        assert steps == [s for s, _ in hist_a[key]]
        assert torch.allclose(torch.tensor(hist_b[key]), torch.tensor(hist_a[key]), atol=1e-6, rtol=0)
    assert [s for s, _ in hist_b["train_loss"]] == list(range(1, STEPS + 1))
    assert [s for s, _ in hist_b["valid_loss"]] == list(range(0, STEPS + 1, 4))


@pytest.mark.parametrize("stage", ["pretrain", "finetune"])
def test_cli_exits_75_when_preempted(tmp_path, monkeypatch, stage):
    from typer.testing import CliRunner

    from pipeline import cli
    from pipeline.train.checkpoint import Preempted

    def preempted(*args, **kwargs):
        raise Preempted(7, "somewhere/step-00000007")

    monkeypatch.setattr(f"pipeline.train.{stage}.run_{stage}", preempted)
    result = CliRunner().invoke(cli.app, ["train", "--stage", stage, "-p", str(write_params(tmp_path))])
    assert result.exit_code == EXIT_PREEMPTED


# ---- in-process: the loop with full weights (pretraining), remote stores, failures -------------------------------


@pytest.fixture
def s3(monkeypatch):
    with moto_s3(monkeypatch) as options:
        yield options


def _job(root: Path, store, on_step=None, fingerprint: str = "fp", **loop):
    from pipeline.train.dataset import TokenWindows
    from pipeline.train.loop import TrainJob
    from pipeline.train.model import build_base
    from tests.pipeline.train.test_model import SEQ, VOCAB

    cfg = tiny_cfg(root, pretrain={"max_steps": 8, **loop})
    corpus = write_token_data(root / "data") / "base"
    return TrainJob(
        build_model=lambda device: build_base(cfg.model, VOCAB, SEQ).to(device),
        train_ds=TokenWindows(corpus / "train.npy", VOCAB.pad_id),
        valid_ds=TokenWindows(corpus / "valid.npy", VOCAB.pad_id),
        loop=cfg.pretrain,
        store=store,
        seed=3,
        fingerprint=fingerprint,
        every_steps=4,
        every_s=3600,
        on_step=on_step,
    )


def _sigterm_at(step: int):
    def on_step(done: int, metrics: dict) -> None:
        if done == step:
            os.kill(os.getpid(), signal.SIGTERM)

    return on_step


def _weights(result) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in result.model.state_dict().items()}


def test_remote_checkpoints_resume_exactly_on_a_new_machine(s3, tmp_path):
    from pipeline.train.checkpoint import CheckpointStore, Preempted
    from pipeline.train.loop import fit

    want = _weights(fit(_job(tmp_path / "ref", CheckpointStore(tmp_path / "ref" / "ckpt"), grad_accum=2)))

    def remote(machine: str) -> CheckpointStore:
        return CheckpointStore("s3://ckpt/pretrain", storage_options=s3, scratch=tmp_path / machine)

    with pytest.raises(Preempted, match="preempted at step 3"):
        fit(_job(tmp_path / "a", remote("machine-a"), on_step=_sigterm_at(3), grad_accum=2))
    result = fit(_job(tmp_path / "b", remote("machine-b"), grad_accum=2))
    assert result.resumed_from == 3 and result.step == 8
    got = _weights(result)
    assert max(float((got[k] - want[k]).abs().max()) for k in want) <= 1e-6


def test_disk_full_mid_training_is_clear_and_keeps_checkpoints(tmp_path, monkeypatch):
    import safetensors.torch

    from pipeline.train.checkpoint import CheckpointError, CheckpointStore
    from pipeline.train.loop import fit

    real_save = safetensors.torch.save_file

    def arm(done: int, metrics: dict) -> None:
        if done == 4:  # the step-4 checkpoint hits a full disk

            def full(*args, **kwargs):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

            monkeypatch.setattr(safetensors.torch, "save_file", full)

    store = CheckpointStore(tmp_path / "ckpt")
    with pytest.raises(CheckpointError, match=r"step 4 .*No space left on device.*kept \(steps \[0\]\)"):
        fit(_job(tmp_path, store, on_step=arm))
    monkeypatch.setattr(safetensors.torch, "save_file", real_save)
    assert store.steps() == [0] and store.latest().meta["step"] == 0
    assert not list((tmp_path / "ckpt").glob(".staging-*"))


def test_corrupt_newest_falls_back_and_other_params_refuse(tmp_path):
    from pipeline.train.checkpoint import CheckpointError, CheckpointStore, Preempted
    from pipeline.train.loop import fit

    store = CheckpointStore(tmp_path / "ckpt", keep=5)
    with pytest.raises(Preempted):
        fit(_job(tmp_path, store, on_step=_sigterm_at(5)))
    assert store.steps() == [0, 4, 5]
    (tmp_path / "ckpt" / "step-00000005" / "optimizer.safetensors").write_bytes(b"torn")
    assert fit(_job(tmp_path, store)).resumed_from == 4
    with pytest.raises(CheckpointError, match=r"made with other params or data.*--fresh"):
        fit(_job(tmp_path, store, fingerprint="other lr"))


def _reseal(folder: Path) -> None:
    """Rewrite a checkpoint's manifest to match its files (what anyone who can write to the store can do)."""
    from pipeline.train.checkpoint import MANIFEST, manifest_for

    old = json.loads((folder / MANIFEST).read_text())
    (folder / MANIFEST).write_text(json.dumps(manifest_for(folder, old["step"], old["meta"])))


def test_a_newest_checkpoint_of_another_training_falls_back(tmp_path, caplog):
    from pipeline.train.checkpoint import CheckpointStore, Preempted
    from pipeline.train.loop import fit

    store = CheckpointStore(tmp_path / "ckpt", keep=5)
    with pytest.raises(Preempted):
        fit(_job(tmp_path, store, on_step=_sigterm_at(5)))
    step5 = tmp_path / "ckpt" / "step-00000005"
    manifest = json.loads((step5 / "MANIFEST.json").read_text())
    manifest["meta"]["fingerprint"] = "other lr"
    (step5 / "MANIFEST.json").write_text(json.dumps(manifest))
    result = fit(_job(tmp_path, store))
    assert result.resumed_from == 4 and result.step == 8
    assert "skipping checkpoint step-00000005: made with other params or data" in caplog.text


class _Payload:
    """Unpickling this creates `path`: the harmless stand-in for code planted in a shared bucket."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


def test_a_pickled_payload_is_refused_unread(tmp_path):
    from pipeline.train.checkpoint import CheckpointStore, Preempted
    from pipeline.train.loop import fit
    from pipeline.train.state import UnsafeCheckpoint

    pickle.loads(pickle.dumps(_Payload(tmp_path / "live")))
    assert (tmp_path / "live").exists()  # the payload does run when unpickled
    store = CheckpointStore(tmp_path / "ckpt", keep=5)
    with pytest.raises(Preempted):
        fit(_job(tmp_path, store, on_step=_sigterm_at(5)))
    step5, marker = tmp_path / "ckpt" / "step-00000005", tmp_path / "unpickled"
    torch.save({"state": _Payload(marker)}, step5 / "optimizer.bin")  # accelerate's name for its optimizer pickle
    _reseal(step5)
    with pytest.raises(
        UnsafeCheckpoint, match=r"refusing to resume from .*step-00000005: optimizer.bin may be a pickle"
    ):
        fit(_job(tmp_path, store))
    (step5 / "optimizer.bin").rename(step5 / "optimizer.safetensors")  # disguised as a tensor file
    _reseal(step5)
    with pytest.raises(UnsafeCheckpoint, match=r"optimizer.safetensors may be a pickle.*--fresh"):
        fit(_job(tmp_path, store))
    assert not marker.exists()


class _Outage:
    """A moto S3 server on 127.0.0.1 that can go away and come back on the same port (moto keeps its data)."""

    def __init__(self, monkeypatch):
        for key, value in {
            "AWS_ACCESS_KEY_ID": "t",
            "AWS_SECRET_ACCESS_KEY": "t",
            "AWS_DEFAULT_REGION": "us-east-1",
        }.items():
            monkeypatch.setenv(key, value)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.server = None
        endpoint = f"http://127.0.0.1:{self.port}"  # one try per request, short connect timeout: fail fast when down
        self.options = {"client_kwargs": {"endpoint_url": endpoint}, "skip_instance_cache": True,
                        "config_kwargs": {"retries": {"max_attempts": 1}, "connect_timeout": 2}}  # fmt: skip

    def up(self) -> None:
        from moto.server import ThreadedMotoServer

        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self.server.start()

    def down(self) -> None:
        self.server.stop()


def test_s3_outage_mid_training_retries_and_training_goes_on(tmp_path, monkeypatch, caplog):
    boto3 = pytest.importorskip("boto3")
    from pipeline.train.checkpoint import CheckpointStore
    from pipeline.train.loop import fit

    want = _weights(fit(_job(tmp_path / "ref", CheckpointStore(tmp_path / "ref" / "ckpt"))))
    s3 = _Outage(monkeypatch)
    s3.up()
    boto3.client("s3", endpoint_url=s3.options["client_kwargs"]["endpoint_url"]).create_bucket(Bucket="outage")
    store = CheckpointStore("s3://outage/pretrain", keep=1, storage_options=s3.options, scratch=tmp_path / "scratch",
                            attempts=3, backoff_s=0.05)  # fmt: skip
    seen = {}

    def weather(done: int, metrics: dict) -> None:
        if done == 2:
            s3.down()  # the step-4 checkpoint finds no store
        if done == 6:
            s3.up()
            seen["steps"] = store.steps()

    caplog.set_level("WARNING")
    try:
        result = fit(_job(tmp_path / "run", store, on_step=weather))
    finally:
        s3.down()
    assert result.step == 8
    assert seen["steps"] == [0]  # keep=1 and a failed upload: the last good checkpoint is still there
    messages = [r.getMessage() for r in caplog.records if r.name.startswith("pipeline")]
    assert any("upload of checkpoint step 4 to s3://outage/pretrain failed (attempt 1/3" in m for m in messages)
    assert any("attempt 2/3" in m and "retrying in 0.1 s" in m for m in messages)
    assert any("failed 3 times" in m and "training goes on" in m for m in messages)
    got = _weights(result)
    assert max(float((got[k] - want[k]).abs().max()) for k in want) <= 1e-6
    s3.up()
    assert store.steps() == [8] and store.latest().meta["step"] == 8


def test_time_based_checkpoints(tmp_path):
    from pipeline.train.checkpoint import CheckpointStore
    from pipeline.train.loop import fit

    store = CheckpointStore(tmp_path / "ckpt", keep=10)
    job = _job(tmp_path, store, max_steps=3, warmup_steps=1)
    job.every_steps, job.every_s = 1000, 1e-9  # every step is "T seconds later"
    fit(job)
    assert store.steps() == [0, 1, 2, 3]
