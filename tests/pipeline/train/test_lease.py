"""One trainer per fingerprint: the S3 lease (compare-and-swap, expiry by the server's clock, fencing of
checkpoints), the local file lock, and two real trainings of one fingerprint started at once."""

from __future__ import annotations

import re
import signal
import threading
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from pipeline.train.checkpoint import CheckpointError, CheckpointStore
from pipeline.train.lease import LEASE_NAME, LeaseLost, S3Lease, exclusive
from tests.pipeline.train.test_checkpoint import moto_s3
from tests.pipeline.train.test_model import tiny_cfg, write_base_bundle, write_params, write_token_data
from tests.pipeline.train.test_resume import ADAPTER, OVER, STEPS, _finish, _launch


@pytest.fixture
def s3(monkeypatch):
    with moto_s3(monkeypatch) as options:
        yield options


def _store(s3: dict, tmp: Path, machine: str) -> CheckpointStore:
    """The test's own store on the bucket (moto's state outlives one server in a process)."""
    return CheckpointStore(f"s3://ckpt/{tmp.name}/finetune/abc", storage_options=s3, scratch=tmp / machine)


def _write(folder: Path) -> None:
    (folder / "w.bin").write_bytes(b"weights")


def test_one_holder_at_a_time_and_release_hands_over(s3, tmp_path):
    a, b = S3Lease(_store(s3, tmp_path, "a"), "fp"), S3Lease(_store(s3, tmp_path, "b"), "fp")
    assert a.try_take() is None  # free: created
    holder = b.try_take()
    assert holder["owner"] == a.owner["owner"] and not holder["released"]
    a.renew()  # still ours: the heartbeat's write goes through
    assert b.try_take()["owner"] == a.owner["owner"]
    a.release()
    assert b.try_take() is None  # released: taken at once
    with pytest.raises(LeaseLost):
        a.renew()  # A's old ETag no longer matches: never writes over B's lease


def test_a_dead_holders_lease_expires_by_the_servers_clock_and_it_is_fenced(s3, tmp_path):
    store_a = _store(s3, tmp_path, "a")
    dead = S3Lease(store_a, "fp", lease_s=2.0)
    assert dead.try_take() is None  # then it stops renewing (its machine is gone)
    b = S3Lease(_store(s3, tmp_path, "b"), "fp", lease_s=2.0)
    assert b.try_take() is not None  # alive as far as anyone can tell
    time.sleep(3.5)  # S3's Last-Modified has a 1 s resolution
    assert b.try_take() is None  # taken over
    c = S3Lease(_store(s3, tmp_path, "c"), "fp", lease_s=2.0)
    assert c.try_take()["owner"] == b.owner["owner"]  # of two racers for the stale lease, one won
    store_a.before_publish = dead.check  # what `exclusive` installs: A comes back and tries to checkpoint
    with pytest.raises(CheckpointError, match="another trainer took this training over"):
        store_a.save(8, _write, {})
    assert store_a.steps() == []


def test_exclusive_renews_while_held_and_waits_for_the_holder(s3, tmp_path):
    order, store = [], _store(s3, tmp_path, "a")

    def second():
        with exclusive(_store(s3, tmp_path, "b"), "fp", poll_s=0.2, lease_s=2.0, renew_s=0.3):
            order.append("second")

    with exclusive(store, "fp", poll_s=0.2, lease_s=2.0, renew_s=0.3):
        waiter = threading.Thread(target=second)
        waiter.start()
        time.sleep(4.0)  # twice the lease: only the renewals keep it
        store.save(4, _write, {})  # published: the lease is still ours
        order.append("first")
    waiter.join(timeout=30)
    assert order == ["first", "second"] and store.steps() == [4]
    assert store.fs.exists(f"{store.root}/{LEASE_NAME}")


def test_local_stores_take_an_os_lock(tmp_path):
    store, order = CheckpointStore(tmp_path / "ckpt"), []

    def second():
        with exclusive(CheckpointStore(tmp_path / "ckpt"), "fp", poll_s=0.1):
            order.append("second")

    with exclusive(store, "fp"):
        waiter = threading.Thread(target=second)
        waiter.start()
        time.sleep(0.5)
        order.append("first")
    waiter.join(timeout=30)
    assert order == ["first", "second"]
    assert not (tmp_path / "ckpt").exists()  # the lock lives elsewhere: bad inputs still leave no folder behind


def _machine(root: Path, s3: dict) -> Path:
    ckpt = {**OVER["checkpoint"], "dir": f"s3://ckpt/{root.parent.name}", "storage_options": s3, "lease_s": 300.0}
    over = {**OVER, "checkpoint": ckpt}
    root.mkdir()
    write_token_data(root / "data")
    write_base_bundle(tiny_cfg(root, **over), seed=0)  # the same bytes on both: the same fingerprint
    write_params(root, **over)
    return root


def _read_until(proc, text: str) -> str:
    seen = []
    for line in proc.stderr:
        seen.append(line)
        if text in line:
            return "".join(seen)
    raise AssertionError(f"exit {proc.wait()} before {text!r}:\n" + "".join(seen)[-3000:])


@pytest.mark.slow
def test_two_trainings_of_one_fingerprint_at_once_train_it_once(s3, tmp_path):
    a, b = _machine(tmp_path / "a", s3), _machine(tmp_path / "b", s3)
    first = _launch(a)
    log_a = _read_until(first, "checkpoint step 0")  # A holds the lease (taken before its step-0 checkpoint)
    first.send_signal(signal.SIGSTOP)  # held still (well inside its lease) so that B surely finds it training
    second = _launch(b)  # a double click: the same training on another machine
    log_b = _read_until(second, "is being trained by")
    first.send_signal(signal.SIGCONT)
    log_b, log_a = log_b + _finish(second), log_a + _finish(first)
    assert re.search(rf"resumed from step {STEPS}\b", log_b), log_b[-3000:]  # after A ended: nothing left to do
    assert not re.search(r"step \d+/\d+ ", log_b) and "checkpoint step" not in log_b  # no step, no upload
    assert len(re.findall(r"checkpoint step \d+ ->", log_a)) == 1 + STEPS // 4  # 0, 4, 8, 12, 16: each once
    want, got = load_file(a / ADAPTER), load_file(b / ADAPTER)
    assert max(float((want[k] - got[k]).abs().max()) for k in want) <= 1e-6
