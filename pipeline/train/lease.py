"""One trainer per fingerprint: a lease on a training's checkpoint store.

Two flow runs of the same pipeline at once (a double click in the UI, two workers, a re-run racing a machine that was
only slow) must not train the same fingerprint twice or interleave checkpoint uploads. Whoever trains holds the
store's lease; a second trainer waits, then resumes from the first one's checkpoints (after a finished training
that is its last step: no step is trained twice). Every entry point takes it (`jam run`, a deployment's flow run,
`jam train`, the SkyPilot job), since all of them end in `fit` of one store.

S3 stores (`s3://`): an object `LEASE.json` in the store's folder, written only with S3's conditional writes
(If-None-Match: * to create, If-Match: <ETag> to renew, take over or release: compare-and-swap, so of two racers
exactly one wins; AWS S3, MinIO and moto honour both). The holder renews it every `renew_s` from a thread. A holder
that dies (a reclaimed VM) stops renewing, and once the object is older than `lease_s` by the S3 server's own clock
(its Last-Modified against the response's Date header: the machines' clocks never enter) the next trainer takes it
over, so a dead machine's lease delays B by at most `lease_s`, never forever. A holder that failed to renew for
`lease_s` (a network partition) may have been taken over: its store publishes no checkpoint until a renewal succeeds
again, and a renewal that finds someone else's ETag means the lease is lost (`LeaseLost`, training stops).
Prefect's own concurrency limits were not used: they are keyed by names the flow knows, while the fingerprint (params
+ data + base weights) is known only inside training, and `jam train` or SkyPilot jobs run without a Prefect server.

Local stores: filelock's OS lock on a file named by the store's path (`local_lock_path`); the kernel releases it when
its holder dies, which is what the lease emulates remotely. Other fsspec filesystems: no lock (a warning says so).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import socket
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from email.utils import parsedate_to_datetime
from typing import Any

from pipeline.train.checkpoint import CheckpointError, CheckpointStore

log = logging.getLogger(__name__)

LEASE_NAME = "LEASE.json"  # S3 stores
LOCK_DIR = "jam-locks"  # local stores: <temp dir>/jam-locks/<sha256 of the store's path>.lock
LEASE_S = 60.0  # seconds without a renewal after which a lease counts as its holder's death (checkpoint.lease_s)
RENEW_S = 15.0  # seconds between renewals: 4 chances before LEASE_S
POLL_S = 5.0  # seconds between looks at a lease held by someone else


class LeaseLost(CheckpointError):
    """Another trainer took this training's lease over (this one could not renew it in time)."""


def _precondition_failed(err: Exception) -> bool:
    """s3fs turns S3's 412 (and 409, concurrent conditional writes) into OSErrors; the S3 code is on the cause."""
    if isinstance(err, FileExistsError):
        return True
    code = getattr(err.__cause__, "response", {}).get("Error", {}).get("Code")
    return code in ("PreconditionFailed", "ConditionalRequestConflict")


class S3Lease:
    """The lease object of one S3 store (see the module docstring). `hold()` returns once this process holds it."""

    def __init__(self, store: CheckpointStore, what: str, lease_s: float = LEASE_S, renew_s: float = RENEW_S):
        self.fs, self.what, self.lease_s, self.renew_s = store.fs, what, lease_s, renew_s
        self.bucket, self.key, _ = self.fs.split_path(f"{store.root}/{LEASE_NAME}")
        self.url = f"{store.url}/{LEASE_NAME}"
        self.owner = {"owner": uuid.uuid4().hex, "host": socket.gethostname(), "pid": os.getpid(), "what": what}
        self.etag: str | None = None
        self.renewed = 0.0  # time.monotonic() of the last successful write
        self.lost = False

    def _put(self, released: bool = False, **condition: str) -> None:
        body = json.dumps({**self.owner, "released": released, "written": time.time()}).encode()
        out = self.fs.call_s3("put_object", Bucket=self.bucket, Key=self.key, Body=body, **condition)
        self.etag, self.renewed = out["ETag"], time.monotonic()

    def _head(self) -> tuple[str, float, dict[str, Any]] | None:
        """(ETag, age in seconds by the server's clock, content) of the lease object; None when there is none."""
        try:
            head = self.fs.call_s3("head_object", Bucket=self.bucket, Key=self.key)
            body = json.loads(self.fs.cat_file(f"{self.bucket}/{self.key}"))
        except FileNotFoundError:
            return None
        now = parsedate_to_datetime(head["ResponseMetadata"]["HTTPHeaders"]["date"])
        return head["ETag"], (now - head["LastModified"]).total_seconds(), body

    def try_take(self) -> dict[str, Any] | None:
        """Take the lease if it is free, released or stale. Returns None when taken, else the holder's record."""
        try:
            self._put(IfNoneMatch="*")
            return None
        except OSError as err:
            if not _precondition_failed(err):
                raise
        seen = self._head()
        if seen is None:
            return self.try_take()  # released and deleted in between: try again
        etag, age, holder = seen
        if not holder.get("released") and age <= self.lease_s:
            return holder
        try:
            self._put(IfMatch=etag)
        except OSError as err:
            if _precondition_failed(err):
                return holder  # another trainer took it first
            raise
        if not holder.get("released"):
            log.warning("took over the training lease of %s (pid %s): silent for %.0f s", holder.get("host"),
                        holder.get("pid"), age)  # fmt: skip
        return None

    def renew(self) -> None:
        """Rewrite the lease if it is still ours. Raises LeaseLost when someone else's write replaced it."""
        try:
            self._put(IfMatch=self.etag)
        except OSError as err:
            if _precondition_failed(err):
                self.lost = True
                raise LeaseLost(f"{self.url}: another trainer took this training over") from err
            raise

    def check(self) -> None:
        """Before publishing a checkpoint: still ours? (renews now if the last renewal is older than the lease)."""
        if self.lost:
            raise LeaseLost(f"{self.url}: another trainer took this training over; not publishing")
        if time.monotonic() - self.renewed > self.lease_s:
            try:
                self.renew()
            except OSError as err:
                raise CheckpointError(f"{self.url}: lease not renewed for {self.lease_s:.0f} s ({err})") from err

    def release(self) -> None:
        with contextlib.suppress(OSError):  # lost or unreachable: it expires by itself
            self._put(released=True, IfMatch=self.etag)

    def _heartbeat(self, stop: threading.Event) -> None:
        while not stop.wait(self.renew_s):
            try:
                self.renew()
            except LeaseLost:
                log.error("%s: another trainer took this training over; stopping at the next checkpoint", self.url)
                return
            except OSError as err:  # S3 unreachable for now: the next beat tries again
                log.warning("could not renew the training lease %s: %s", self.url, err)

    @contextlib.contextmanager
    def hold(self, poll_s: float = POLL_S) -> Iterator[S3Lease]:
        waited = False
        while (holder := self.try_take()) is not None:
            if not waited:
                log.warning("%s is being trained by %s (pid %s, lease %s); waiting for it", self.what,
                            holder.get("host"), holder.get("pid"), self.url)  # fmt: skip
            waited = True
            time.sleep(poll_s)
        stop = threading.Event()
        beat = threading.Thread(target=self._heartbeat, args=(stop,), name="jam-lease", daemon=True)
        beat.start()
        try:
            yield self
        finally:
            stop.set()
            beat.join()
            self.release()


def local_lock_path(store: CheckpointStore) -> str:
    """The OS lock file of a local store: in the temp dir, named by the store's real path (a lock file inside the
    store would create the folder before training has checked its inputs, and one must never be deleted)."""
    key = hashlib.sha256(os.path.realpath(store.root).encode()).hexdigest()[:16]
    return os.path.join(tempfile.gettempdir(), LOCK_DIR, f"{key}.lock")


@contextlib.contextmanager
def _file_lock(store: CheckpointStore, what: str, poll_s: float) -> Iterator[None]:
    from filelock import FileLock, Timeout

    path = local_lock_path(store)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    lock = FileLock(path)
    while True:
        try:
            lock.acquire(timeout=poll_s)
            break
        except Timeout:
            log.warning("%s is being trained by another process on this machine (%s); waiting", what, lock.lock_file)
    try:
        yield
    finally:
        lock.release()


@contextlib.contextmanager
def exclusive(store: CheckpointStore, what: str, poll_s: float = POLL_S, **lease: float) -> Iterator[None]:
    """Hold `store`'s lease (waiting for it) while the block trains; its checkpoints are published only while held.

    Args:
        store: the training's checkpoint store (one per fingerprint).
        what: what is trained, for the messages (stage and fingerprint).
        poll_s: seconds between looks at a lease someone else holds.
        lease: `lease_s`, `renew_s` of an S3 lease (module defaults otherwise).
    """
    if store.is_local:
        with _file_lock(store, what, poll_s):
            yield
        return
    if type(store.fs).__name__ != "S3FileSystem":
        log.warning("no training lease on %s (S3 and local stores only): two trainers could run at once", store.url)
        yield
        return
    held = S3Lease(store, what, **lease)
    with held.hold(poll_s):
        store.before_publish = held.check
        try:
            yield
        finally:
            store.before_publish = None
