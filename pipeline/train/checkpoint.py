"""Spot safety: atomic, checksummed, rotating checkpoints on a local folder or any fsspec URL (`s3://bucket/prefix`),
and the SIGTERM handling that turns a preemption notice into one last checkpoint.

Layout under the store's root:
    step-00000040/        one checkpoint: the files a writer put there (see state.py: safetensors + JSON)
        MANIFEST.json     written last: {"step", "files": {relative path: {"sha256", "bytes"}}, "meta", "created"}
A folder without MANIFEST.json is partial (killed mid-write) and ignored. A file whose size or sha256 differs from
the manifest marks the checkpoint corrupt, and `latest()` falls back to the one before.

accelerate's own `ProjectConfiguration(automatic_checkpoint_naming=True, total_limit=K)` is not used for the folder
management: it writes in place to local paths only (a kill mid-write leaves a half folder it would later load),
deletes the oldest checkpoint *before* the new one exists, and keeps no checksums. The
contents are written by `state.save_training` into a staging folder that this module publishes.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from pipeline.core.config import Config
from pipeline.core.files import sha256_file

log = logging.getLogger(__name__)

MANIFEST = "MANIFEST.json"
STEP_PREFIX = "step-"
STAGING_PREFIX = ".staging-"
_STEP_RE = re.compile(rf"^{STEP_PREFIX}(\d+)$")


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or read; the message names the location and keeps earlier ones safe."""


class CorruptCheckpoint(CheckpointError):
    """A checkpoint's files do not match its manifest."""


class UploadFailed(CheckpointError):
    """A checkpoint could not be uploaded after every retry; the store still holds the earlier ones."""


class Preempted(RuntimeError):
    """Training stopped on a signal after writing a checkpoint; re-running the same command resumes."""

    def __init__(self, step: int, where: str):
        super().__init__(f"preempted at step {step}; checkpoint {where}; re-run the same command to resume")
        self.step, self.where = step, where


@contextlib.contextmanager
def stop_on_signals() -> Iterator[threading.Event]:
    """An event set by SIGTERM or a first SIGINT (a second SIGINT interrupts at once)."""
    event = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield event
        return

    def handler(signum: int, frame: Any) -> None:
        if signum == signal.SIGINT and event.is_set():
            raise KeyboardInterrupt
        log.warning("signal %d: finishing this step, then checkpointing", signum)
        event.set()

    previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield event
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


@dataclass(frozen=True)
class Checkpoint:
    """A verified checkpoint available as a local folder."""

    step: int
    path: Path  # local folder holding the files (a download for remote stores)
    manifest: dict[str, Any]

    @property
    def meta(self) -> dict[str, Any]:
        return self.manifest.get("meta", {})


def step_name(step: int) -> str:
    return f"{STEP_PREFIX}{step:08d}"


def manifest_for(folder: Path, step: int, meta: dict[str, Any]) -> dict[str, Any]:
    """sha256 and size of every file under `folder` (the manifest itself excluded)."""
    files = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST):
        files[path.relative_to(folder).as_posix()] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
    return {"step": step, "files": files, "meta": meta, "created": time.time()}


def verify(folder: Path) -> dict[str, Any]:
    """The manifest of a local checkpoint folder, after checking every file against it.

    Raises:
        CorruptCheckpoint: manifest missing or unreadable, a file missing, resized or changed.
    """
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        files = manifest["files"]
    except (OSError, ValueError, KeyError) as err:
        raise CorruptCheckpoint(f"{folder}: unreadable manifest ({err})") from None
    for rel, want in files.items():
        if not _inside(rel):
            raise CorruptCheckpoint(f"{folder}: the manifest names {rel!r}, outside the checkpoint")
        path = folder / rel
        if not path.is_file() or path.stat().st_size != want["bytes"]:
            raise CorruptCheckpoint(f"{folder}: {rel} is missing or truncated")
        if sha256_file(path) != want["sha256"]:
            raise CorruptCheckpoint(f"{folder}: {rel} does not match its sha256")
    return manifest


def _inside(rel: str) -> bool:
    """Whether a relative path from a manifest or a remote listing stays inside its checkpoint folder."""
    parts = Path(rel).parts
    return bool(parts) and not Path(rel).is_absolute() and ".." not in parts


class CheckpointStore:
    """The checkpoints of one training, under `url` (a local path or an fsspec URL).

    Args:
        url: root folder or URL; created on first write.
        keep: newest complete checkpoints kept after each successful write (>= 1).
        storage_options: fsspec options (e.g. `{"client_kwargs": {"endpoint_url": ...}}` for S3).
        scratch: local folder for staging and downloads of a remote store (None: a fresh temp dir).
        attempts: tries of each remote upload or download before giving up (>= 1).
        backoff_s: seconds before the second try; doubled before each further one.
    """

    def __init__(
        self,
        url: str | Path,
        keep: int = 3,
        storage_options: dict[str, Any] | None = None,
        scratch: Path | None = None,
        attempts: int = 5,
        backoff_s: float = 2.0,
    ):
        self.url = str(url).rstrip("/")
        self.keep = max(1, keep)
        self.attempts, self.backoff_s = max(1, attempts), backoff_s
        self.fs, self.root = fsspec.core.url_to_fs(self.url, **(storage_options or {}))
        self.is_local = isinstance(self.fs, LocalFileSystem)
        self._scratch = scratch

    @property
    def scratch(self) -> Path:
        if self._scratch is None:
            self._scratch = Path(tempfile.mkdtemp(prefix="jam-ckpt-"))
        self._scratch.mkdir(parents=True, exist_ok=True)
        return self._scratch

    def _join(self, *parts: str) -> str:
        return "/".join([self.root.rstrip("/"), *parts])

    def _listing(self) -> dict[int, bool]:
        """Step -> whether its folder has a manifest (complete), for every `step-*` folder."""
        self.fs.invalidate_cache()  # another machine may have written since (s3fs caches listings)
        try:
            entries = self.fs.ls(self.root, detail=False)
        except FileNotFoundError:
            return {}
        except OSError as err:
            raise CheckpointError(f"cannot list checkpoints at {self.url}: {err}") from err
        steps = {}
        for entry in entries:
            m = _STEP_RE.match(entry.rstrip("/").rsplit("/", 1)[-1])
            if m:
                steps[int(m.group(1))] = self.fs.exists(self._join(m.group(0), MANIFEST))
        return steps

    def steps(self) -> list[int]:
        """Steps of complete (manifest-bearing) checkpoints, ascending. Completeness is not verification."""
        return sorted(s for s, complete in self._listing().items() if complete)

    def staging(self, step: int) -> Path:
        """An empty local folder to write checkpoint `step` into (same name on every process of a node)."""
        base = Path(self.root) if self.is_local else self.scratch
        folder = base / f"{STAGING_PREFIX}{step_name(step)}"
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        return folder

    def save(self, step: int, write: Callable[[Path], Any], meta: dict[str, Any] | None = None) -> str:
        """Write checkpoint `step` with `write(folder)`, publish it atomically, then drop old ones.

        Returns:
            The checkpoint's location (path or URL).

        Raises:
            CheckpointError: anything failed (disk full, permissions, network); earlier checkpoints are untouched.
        """
        try:
            folder = self.staging(step)
        except OSError as err:
            raise CheckpointError(f"cannot write checkpoints to {self.url}: {err}") from err
        try:
            write(folder)
            return self.commit(step, folder, meta or {})
        except UploadFailed:
            raise
        except Exception as err:
            shutil.rmtree(folder, ignore_errors=True)
            raise CheckpointError(
                f"checkpoint step {step} could not be written to {self.url}: {err}; "
                f"earlier checkpoints are kept (steps {self._steps_or_unknown()})"
            ) from err

    def _steps_or_unknown(self) -> list[int] | str:
        try:
            return self.steps()
        except CheckpointError:
            return "unknown: the store cannot be listed"

    def commit(self, step: int, folder: Path, meta: dict[str, Any]) -> str:
        """Add the manifest to a written staging folder and publish it as `step-<step>`; then prune.

        Raises:
            UploadFailed: a remote store stayed unreachable through every retry (the staging folder is removed).
        """
        manifest = manifest_for(folder, step, meta)
        (folder / MANIFEST).write_text(json.dumps(manifest, indent=1))
        dest = self._join(step_name(step))
        if self.is_local:
            self._publish_local(folder, Path(dest))
        else:
            upload = lambda: self._publish_remote(folder, dest, manifest)  # noqa: E731
            try:
                self._retrying(f"upload of checkpoint step {step} to {self.url}", upload)
            finally:
                shutil.rmtree(folder, ignore_errors=True)
        try:  # only after the new checkpoint is complete: the older ones stay until then
            self.prune(keep_step=step)
        except OSError as err:  # the next write prunes again
            log.warning("checkpoint step %d written, but old checkpoints could not be pruned: %s", step, err)
        return dest if self.is_local else f"{self.url}/{step_name(step)}"

    def _retrying(self, what: str, action: Callable[[], Any]) -> Any:
        """`action()`, tried `attempts` times with doubling delays; network errors take many types, hence any.

        fsspec/s3fs and botocore retry single requests briefly; this outer loop rides out an outage of the store
        (minutes) for a whole checkpoint, and says so. Raises UploadFailed after the last try.
        """
        delay = self.backoff_s
        for attempt in range(1, self.attempts + 1):
            try:
                return action()
            except CheckpointError:  # corrupt or unsafe content: trying again reads the same bytes
                raise
            except Exception as err:
                if attempt == self.attempts:
                    raise UploadFailed(f"{what} failed {attempt} times, last: {err}") from err
                log.warning(
                    "%s failed (attempt %d/%d: %s); retrying in %.1f s",
                    what, attempt, self.attempts, err, delay,
                )  # fmt: skip
                time.sleep(delay)
                delay *= 2

    def _publish_local(self, folder: Path, dest: Path) -> None:
        if dest.exists():  # an older, corrupt write of the same step: move it aside first
            trash = dest.with_name(f"{STAGING_PREFIX}old-{dest.name}")
            shutil.rmtree(trash, ignore_errors=True)
            os.replace(dest, trash)
            shutil.rmtree(trash, ignore_errors=True)
        os.replace(folder, dest)

    def _publish_remote(self, folder: Path, dest: str, manifest: dict[str, Any]) -> None:
        # A `dest` already there is partial (an upload cut short) or one `latest()` rejected (corrupt or foreign):
        # training resumes from the newest usable checkpoint, so no usable one is ever newer than the step written.
        # Its manifest goes first, so it never passes for complete while its files are replaced.
        if self.fs.exists(f"{dest}/{MANIFEST}"):
            self.fs.rm(f"{dest}/{MANIFEST}")
        for rel in manifest["files"]:  # the manifest goes last: its presence marks the upload complete
            self.fs.put_file(str(folder / rel), f"{dest}/{rel}")
        self.fs.put_file(str(folder / MANIFEST), f"{dest}/{MANIFEST}")

    def prune(self, keep_step: int | None = None) -> None:
        """Delete partial folders and all but the newest `keep` complete checkpoints (never `keep_step`)."""
        listing = self._listing()
        complete = sorted((s for s, ok in listing.items() if ok), reverse=True)
        doomed = [s for s, ok in listing.items() if not ok] + complete[self.keep :]
        for step in doomed:
            if step != keep_step:
                self.fs.rm(self._join(step_name(step)), recursive=True)
        if self.is_local and Path(self.root).is_dir():  # staging left by a killed writer
            for stale in Path(self.root).glob(f"{STAGING_PREFIX}*"):
                shutil.rmtree(stale, ignore_errors=True)

    def fetch(self, step: int) -> Path:
        """A local folder with checkpoint `step`'s files (the folder itself for a local store)."""
        src = self._join(step_name(step))
        if self.is_local:
            return Path(src)
        local = self.scratch / step_name(step)
        shutil.rmtree(local, ignore_errors=True)
        local.mkdir(parents=True)
        for path in self.fs.find(src):
            rel = path[len(src.rstrip("/")) + 1 :]
            if not _inside(rel):  # a shared bucket is untrusted: no writes outside the scratch folder
                raise CorruptCheckpoint(f"{src}: remote file {rel!r} would land outside the checkpoint")
            (local / rel).parent.mkdir(parents=True, exist_ok=True)
            self.fs.get_file(path, str(local / rel))
        return local

    def latest(self, fingerprint: str | None = None) -> Checkpoint | None:
        """The newest checkpoint that verifies (and was written by `fingerprint`'s training, when given).

        Corrupt checkpoints and ones of another fingerprint are reported and skipped: the one before is used.
        A download that keeps failing is an error, not a reason to fall back (that would redo work and then
        overwrite a good checkpoint). None: no checkpoint at all, or only corrupt ones (a fresh start).

        Raises:
            CheckpointError: the store cannot be listed or read; or every complete checkpoint is another
                training's (resuming would be wrong and starting over here would prune them).
        """
        foreign = []
        for step in reversed(self.steps()):
            try:
                what = f"download of checkpoint step {step} from {self.url}"
                folder = self._retrying(what, lambda s=step: self.fetch(s))
                ckpt = Checkpoint(step=step, path=folder, manifest=verify(folder))
            except CorruptCheckpoint as err:
                log.warning("skipping corrupt checkpoint: %s", err)
                continue
            except UploadFailed as err:
                raise CheckpointError(str(err).replace("failed", "could not be read", 1)) from err
            if fingerprint is None or ckpt.meta.get("fingerprint") == fingerprint:
                return ckpt
            foreign.append(step)
            log.warning("skipping checkpoint %s: made with other params or data", step_name(step))
        if foreign:
            raise CheckpointError(
                f"checkpoints in {self.url} (steps {sorted(foreign)}) were made with other params or data; "
                "re-run with --fresh to start over (or restore the params)"
            )
        return None

    def clear(self) -> None:
        """Delete every checkpoint (a `--fresh` start)."""
        for step in self._listing():
            self.fs.rm(self._join(step_name(step)), recursive=True)


def store_for(cfg: Config, stage: str, fingerprint: str | None = None) -> CheckpointStore:
    """The checkpoint store of a training: `checkpoint.dir/<stage>`, or `<data_dir>/checkpoints/<stage>`.

    With `fingerprint` (params + data of the training), each training gets its own sub-folder: changing params starts
    a new training beside the old one, and changing them back resumes the old one. The default sits outside the
    stage's DVC-tracked folder: checkpoints are transient, the bundle is the output.
    """
    cc = cfg.checkpoint
    url = f"{cc.dir.rstrip('/')}/{stage}" if cc.dir else str(cfg.stage_dir("checkpoints") / stage)
    if fingerprint:
        url = f"{url}/{fingerprint[:16]}"
    scratch = cc.scratch_dir / stage if cc.scratch_dir else None
    return CheckpointStore(url, cc.keep, dict(cc.storage_options), scratch, cc.upload_attempts, cc.upload_backoff_s)
