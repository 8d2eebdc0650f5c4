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
    UploadFailed,
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


# ---- faults: an unreachable store, other trainings' checkpoints, untrusted paths ---------------------------------


def _flaky_put(store: CheckpointStore, monkeypatch, fail: int | None) -> list[str]:
    """Make the store's uploads raise ConnectionError for the first `fail` calls (None: always); returns the log."""
    real, calls = store.fs.put_file, []

    def put_file(lpath, rpath, **kwargs):
        calls.append(rpath)
        if fail is None or len(calls) <= fail:
            raise ConnectionError("Could not connect to the endpoint URL")
        return real(lpath, rpath, **kwargs)

    monkeypatch.setattr(store.fs, "put_file", put_file)
    return calls


def test_upload_retries_with_backoff_and_says_so(s3, tmp_path, monkeypatch, caplog):
    store = CheckpointStore("s3://ckpt/retry", keep=1, storage_options=s3, scratch=tmp_path, attempts=3, backoff_s=0.01)
    calls = _flaky_put(store, monkeypatch, fail=2)
    caplog.set_level("WARNING", logger="pipeline.train.checkpoint")
    store.save(4, _writer("w4"))
    assert store.steps() == [4] and _payload(store) == "w4"
    warned = [r.getMessage() for r in caplog.records]
    assert len(warned) == 2 and len(calls) == 2 + 3  # two failed tries, then the 2 files and the manifest
    assert "upload of checkpoint step 4 to s3://ckpt/retry failed (attempt 1/3" in warned[0]
    assert "retrying in 0.0 s" in warned[0] and "attempt 2/3" in warned[1] and "retrying in 0.0 s" in warned[1]


def test_an_upload_that_keeps_failing_keeps_the_last_good_one(s3, tmp_path, monkeypatch):
    store = CheckpointStore("s3://ckpt/keep", keep=1, storage_options=s3, scratch=tmp_path, attempts=2, backoff_s=0)
    store.save(4, _writer("good"))
    real = store.fs.put_file

    def put_file(lpath, rpath, **kwargs):  # the files go up, the manifest never does (the link drops)
        if rpath.endswith(MANIFEST):
            raise ConnectionError("Could not connect to the endpoint URL")
        return real(lpath, rpath, **kwargs)

    monkeypatch.setattr(store.fs, "put_file", put_file)
    with pytest.raises(UploadFailed, match=r"upload of checkpoint step 8 .* failed 2 times"):
        store.save(8, _writer("new"))
    assert store.fs.exists("ckpt/keep/step-00000008/weights.bin")  # partial: ignored, not pruned over step 4
    assert store.steps() == [4] and _payload(store) == "good"
    assert not list(tmp_path.glob(".staging-*"))
    monkeypatch.setattr(store.fs, "put_file", real)
    store.save(12, _writer("later"))
    assert store.steps() == [12] and not store.fs.exists("ckpt/keep/step-00000008")


def test_rewriting_a_step_hides_the_old_one_before_replacing_files(s3, tmp_path, monkeypatch):
    store = CheckpointStore("s3://ckpt/rewrite", keep=3, storage_options=s3, scratch=tmp_path, attempts=1)
    store.save(4, _writer("good"))
    store.save(8, _writer("flipped"))
    store.fs.pipe_file("ckpt/rewrite/step-00000008/weights.bin", b"xxxxxxx")  # corrupt: resume falls back to 4
    _flaky_put(store, monkeypatch, fail=None)
    with pytest.raises(UploadFailed):
        store.save(8, _writer("again"))
    assert not store.fs.exists(f"ckpt/rewrite/step-00000008/{MANIFEST}") and store.latest().step == 4


def test_other_fingerprints_fall_back_or_refuse(tmp_path, caplog):
    store = CheckpointStore(tmp_path / "ckpt", keep=5)
    store.save(4, _writer("mine"), {"fingerprint": "a"})
    store.save(8, _writer("theirs"), {"fingerprint": "b"})
    assert store.latest().step == 8  # no fingerprint asked: the newest
    ckpt = store.latest("a")
    assert ckpt.step == 4 and (ckpt.path / "weights.bin").read_text() == "mine"
    assert "skipping checkpoint step-00000008: made with other params or data" in caplog.text
    with pytest.raises(CheckpointError, match=r"steps \[4, 8\]\) were made with other params.*--fresh"):
        store.latest("c")


def test_a_failing_download_is_an_error_not_a_fallback(s3, tmp_path, monkeypatch):
    store = CheckpointStore("s3://ckpt/download", storage_options=s3, scratch=tmp_path, attempts=2, backoff_s=0)
    store.save(4, _writer("w4"))
    store.save(8, _writer("w8"))

    def get_file(*args, **kwargs):
        raise ConnectionError("Could not connect to the endpoint URL")

    monkeypatch.setattr(store.fs, "get_file", get_file)
    with pytest.raises(CheckpointError, match=r"download of checkpoint step 8 .* could not be read 2 times"):
        store.latest()


def test_paths_leaving_the_checkpoint_are_corrupt(s3, tmp_path):
    store = CheckpointStore(tmp_path / "ckpt")
    store.save(4, _writer("w4"))
    manifest_path = tmp_path / "ckpt" / "step-00000004" / MANIFEST
    manifest = json.loads(manifest_path.read_text())
    manifest["files"]["../../outside"] = {"sha256": "0", "bytes": 1}
    manifest_path.write_text(json.dumps(manifest))
    assert store.latest() is None

    remote = CheckpointStore("s3://ckpt/escape", storage_options=s3, scratch=tmp_path / "scratch")
    remote.save(4, _writer("w4"))
    remote.fs.pipe_file("ckpt/escape/step-00000004/../../escape", b"x")  # S3 keys may hold '..'
    assert "ckpt/escape/step-00000004/../../escape" in remote.fs.find("ckpt/escape/step-00000004")
    assert remote.latest() is None  # refused (the only checkpoint), nothing written outside the scratch folder
    assert not (tmp_path / "escape").exists() and not (tmp_path / "scratch" / "escape").exists()
