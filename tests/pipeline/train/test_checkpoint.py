"""Checkpoint store: atomic publish, checksums, fallback, retention, failures, and an S3 (moto) store."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import signal
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from pipeline.train.checkpoint import (
    MANIFEST,
    CheckpointError,
    CheckpointStore,
    stop_on_signals,
    store_for,
    verify,
)
from tests.pipeline.train.test_model import tiny_cfg


def _writer(payload: str):
    def write(folder: Path) -> None:
        (folder / "weights.bin").write_text(payload)
        (folder / "sub").mkdir()
        (folder / "sub" / "rng.pkl").write_text(payload[::-1])

    return write


def _payload(store: CheckpointStore) -> str:
    ckpt = store.latest()
    return (ckpt.path / "weights.bin").read_text()


def test_save_verify_and_keep_newest(tmp_path):
    store = CheckpointStore(tmp_path / "ckpt", keep=2)
    for step in (0, 4, 8):
        store.save(step, _writer(f"w{step}"), {"step": step, "run_id": "r"})
    assert store.steps() == [4, 8]
    ckpt = store.latest()
    assert ckpt.step == 8 and ckpt.meta == {"step": 8, "run_id": "r"}
    assert set(verify(ckpt.path)["files"]) == {"weights.bin", "sub/rng.pkl"}
    assert not list((tmp_path / "ckpt").glob(".staging-*"))


def test_partial_and_corrupt_newest_fall_back(tmp_path):
    store = CheckpointStore(tmp_path / "ckpt", keep=5)
    store.save(4, _writer("good"))
    store.save(8, _writer("flipped"))
    (tmp_path / "ckpt" / "step-00000012").mkdir()  # killed mid-write: no manifest
    (tmp_path / "ckpt" / "step-00000012" / "weights.bin").write_text("half")
    assert store.steps() == [4, 8]
    weights = tmp_path / "ckpt" / "step-00000008" / "weights.bin"
    weights.write_text("flopped")  # same size, other bytes
    assert store.latest().step == 4 and _payload(store) == "good"
    weights.write_text("short")  # truncated
    assert store.latest().step == 4
    (tmp_path / "ckpt" / "step-00000004" / MANIFEST).write_text("{not json")
    assert store.latest() is None


def test_rewriting_a_step_replaces_it(tmp_path):
    store = CheckpointStore(tmp_path / "ckpt")
    store.save(4, _writer("old"))
    store.save(4, _writer("new"))
    assert store.steps() == [4] and _payload(store) == "new"
    store.clear()
    assert store.steps() == [] and store.latest() is None


def test_unwritable_location_is_a_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    store = CheckpointStore(blocker / "ckpt")
    with pytest.raises(CheckpointError, match="cannot write checkpoints to"):
        store.save(0, _writer("x"))


def test_disk_full_keeps_previous_checkpoints(tmp_path):
    store = CheckpointStore(tmp_path / "ckpt")
    store.save(4, _writer("safe"))

    def full(folder: Path) -> None:
        (folder / "weights.bin").write_text("partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with pytest.raises(CheckpointError, match=r"No space left on device.*earlier checkpoints are kept \(steps \[4\]\)"):
        store.save(8, full)
    assert store.steps() == [4] and _payload(store) == "safe"
    assert not list((tmp_path / "ckpt").glob(".staging-*"))


def test_store_for_stage_locations(tmp_path):
    cfg = tiny_cfg(tmp_path)
    assert store_for(cfg, "finetune").url == str(tmp_path / "data" / "checkpoints" / "finetune")
    cfg = tiny_cfg(tmp_path, checkpoint={"dir": "s3://bucket/runs/", "storage_options": {"anon": True}})
    store = store_for(cfg, "pretrain")
    assert store.url == "s3://bucket/runs/pretrain" and not store.is_local


def test_sigterm_sets_the_stop_event():
    before = signal.getsignal(signal.SIGTERM)
    with stop_on_signals() as stop:
        assert not stop.is_set()
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.wait(5)
    assert signal.getsignal(signal.SIGTERM) == before


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def moto_s3(monkeypatch) -> Iterator[dict]:
    """A moto S3 server on 127.0.0.1 with bucket `ckpt`; yields fsspec storage options pointing at it."""
    boto3 = pytest.importorskip("boto3")
    from moto.server import ThreadedMotoServer

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="ckpt")
    try:
        yield {"client_kwargs": {"endpoint_url": endpoint}, "skip_instance_cache": True}
    finally:
        server.stop()


@pytest.fixture
def s3(monkeypatch):
    with moto_s3(monkeypatch) as options:
        yield options


def test_s3_store_round_trip_on_a_new_machine(s3, tmp_path):
    writer = CheckpointStore("s3://ckpt/run", keep=2, storage_options=s3, scratch=tmp_path / "machine-a")
    for step in (0, 4, 8):
        writer.save(step, _writer(f"w{step}"), {"step": step})
    assert not (tmp_path / "machine-a" / ".staging-step-00000008").exists()

    reader = CheckpointStore("s3://ckpt/run", keep=2, storage_options=s3, scratch=tmp_path / "machine-b")
    assert reader.steps() == [4, 8]
    ckpt = reader.latest()
    assert ckpt.step == 8 and ckpt.path.is_relative_to(tmp_path / "machine-b")
    assert (ckpt.path / "sub" / "rng.pkl").read_text() == "8w"
    manifest = json.loads((ckpt.path / MANIFEST).read_text())
    assert manifest["meta"] == {"step": 8}

    reader.fs.pipe_file("ckpt/run/step-00000008/weights.bin", b"xx")  # corrupt the newest remotely
    assert reader.latest().step == 4


def test_each_training_fingerprint_has_its_own_store(tmp_path):
    cfg = tiny_cfg(tmp_path)
    a, b = store_for(cfg, "finetune", "a" * 64), store_for(cfg, "finetune", "b" * 64)
    assert a.url != b.url and a.url.startswith(str(tmp_path / "data" / "checkpoints" / "finetune"))
