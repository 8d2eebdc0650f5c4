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
        path = folder / rel
        if not path.is_file() or path.stat().st_size != want["bytes"]:
            raise CorruptCheckpoint(f"{folder}: {rel} is missing or truncated")
        if sha256_file(path) != want["sha256"]:
            raise CorruptCheckpoint(f"{folder}: {rel} does not match its sha256")
    return manifest


class CheckpointStore:
    """The checkpoints of one training, under `url` (a local path or an fsspec URL).

    Args:
        url: root folder or URL; created on first write.
        keep: newest complete checkpoints kept after each successful write (>= 1).
        storage_options: fsspec options (e.g. `{"client_kwargs": {"endpoint_url": ...}}` for S3).
        scratch: local folder for staging and downloads of a remote store (None: a fresh temp dir).
    """

    def __init__(
        self,
        url: str | Path,
        keep: int = 3,
        storage_options: dict[str, Any] | None = None,
        scratch: Path | None = None,
    ):
        self.url = str(url).rstrip("/")
        self.keep = max(1, keep)
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
        except Exception as err:
            shutil.rmtree(folder, ignore_errors=True)
            raise CheckpointError(
                f"checkpoint step {step} could not be written to {self.url}: {err}; "
                f"earlier checkpoints are kept (steps {self.steps()})"
            ) from err

    def commit(self, step: int, folder: Path, meta: dict[str, Any]) -> str:
        """Add the manifest to a written staging folder and publish it as `step-<step>`; then prune."""
        manifest = manifest_for(folder, step, meta)
        (folder / MANIFEST).write_text(json.dumps(manifest, indent=1))
        dest = self._join(step_name(step))
        if self.is_local:
            self._publish_local(folder, Path(dest))
        else:
            self._publish_remote(folder, dest, manifest)
        self.prune(keep_step=step)
        return dest if self.is_local else f"{self.url}/{step_name(step)}"

    def _publish_local(self, folder: Path, dest: Path) -> None:
        if dest.exists():  # an older, corrupt write of the same step: move it aside first
            trash = dest.with_name(f"{STAGING_PREFIX}old-{dest.name}")
            shutil.rmtree(trash, ignore_errors=True)
            os.replace(dest, trash)
            shutil.rmtree(trash, ignore_errors=True)
        os.replace(folder, dest)

    def _publish_remote(self, folder: Path, dest: str, manifest: dict[str, Any]) -> None:
        if self.fs.exists(dest):
            self.fs.rm(dest, recursive=True)
        for rel in manifest["files"]:  # the manifest goes last: its presence marks the upload complete
            self.fs.put_file(str(folder / rel), f"{dest}/{rel}")
        self.fs.put_file(str(folder / MANIFEST), f"{dest}/{MANIFEST}")
        shutil.rmtree(folder, ignore_errors=True)

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
            (local / rel).parent.mkdir(parents=True, exist_ok=True)
            self.fs.get_file(path, str(local / rel))
        return local

    def latest(self) -> Checkpoint | None:
        """The newest checkpoint that verifies; corrupt ones are reported and skipped. None: no usable checkpoint."""
        for step in reversed(self.steps()):
            try:
                folder = self.fetch(step)
                return Checkpoint(step=step, path=folder, manifest=verify(folder))
            except CorruptCheckpoint as err:
                log.warning("skipping corrupt checkpoint: %s", err)
            except (OSError, FileNotFoundError) as err:
                log.warning("skipping unreadable checkpoint %s: %s", step_name(step), err)
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
    return CheckpointStore(url, cc.keep, dict(cc.storage_options), scratch)
