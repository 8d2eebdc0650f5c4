"""Atomic writes, content hashes, and the per-item index that makes every stage incremental.

A stage driver asks `ItemIndex.fresh(item_id, key)` before doing work: `key` hashes everything the item's output
depends on (input content, the stage's params, the code version). Same key and outputs still on disk: skip.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pipeline import constants as C


@contextlib.contextmanager
def atomic_path(dest: Path | str) -> Iterator[Path]:
    """Yield a temporary path beside `dest`; on success it is renamed over `dest`, on error it is removed.

    Writers that need a filename (pretty_midi, soundfile, ffmpeg) write to the yielded path, so a crash never
    leaves a partial file under the final name.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp" + dest.suffix, dir=dest.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        if tmp_path.exists():
            os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600; outputs are ordinary files
        os.replace(tmp_path, dest)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


@functools.cache
def _umask() -> int:
    """The process umask (read once: reading it means setting it, which is not thread-safe)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_bytes(dest: Path | str, data: bytes) -> None:
    with atomic_path(dest) as tmp:
        tmp.write_bytes(data)


def write_text(dest: Path | str, text: str) -> None:
    write_bytes(dest, text.encode())


def write_json(dest: Path | str, obj: Any) -> None:
    write_text(dest, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def read_json(path: Path | str, default: Any = None) -> Any:
    path = Path(path)
    if not path.exists():
        return default
    return json.loads(path.read_text())


def sha256_file(path: Path | str, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_text(*parts: str) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p.encode())
        h.update(b"\0")
    return h.hexdigest()


@dataclass
class StageReport:
    """What a stage did this run. Written as `report.json` beside the stage's outputs."""

    stage: str
    items_in: int = 0
    processed: list[str] = field(default_factory=list)  # did work this run
    cached: list[str] = field(default_factory=list)  # up to date, no work
    failed: dict[str, str] = field(default_factory=dict)  # item id -> clear error message
    dropped: dict[str, str] = field(default_factory=dict)  # item id -> why it was filtered out (not an error)
    outputs: int = 0
    seconds: float = 0.0
    stats: dict[str, Any] = field(default_factory=dict)  # stage-specific figures
    started: float = field(default_factory=time.time)

    def finish(self, out_dir: Path, config_json: str | None = None) -> StageReport:
        self.seconds = round(time.time() - self.started, 3)
        write_json(out_dir / C.REPORT_NAME, asdict(self))
        if config_json is not None:
            write_text(out_dir / C.CONFIG_NAME, json.dumps(json.loads(config_json), indent=2) + "\n")
        return self

    @classmethod
    def load(cls, out_dir: Path, **updates: Any) -> StageReport:
        """The report a stage last wrote in `out_dir` (an empty one if none), with `updates` applied."""
        fields = read_json(out_dir / C.REPORT_NAME, {}) or {}
        known = {k: v for k, v in fields.items() if k in cls.__dataclass_fields__ and k != "started"}
        return cls(**{"stage": out_dir.name, **known, **updates})

    def summary(self) -> str:
        parts = [f"{self.stage}: {self.items_in} in", f"{len(self.processed)} processed", f"{len(self.cached)} cached"]
        if self.dropped:
            parts.append(f"{len(self.dropped)} dropped")
        if self.failed:
            parts.append(f"{len(self.failed)} failed")
        parts.append(f"{self.outputs} out ({self.seconds:.1f} s)")
        return ", ".join(parts)


class AllItemsFailed(RuntimeError):
    """Every item of a stage failed: nothing to hand downstream."""


def raise_if_all_failed(report: StageReport) -> None:
    if report.items_in and len(report.failed) == report.items_in:
        first = next(iter(report.failed.items()))
        raise AllItemsFailed(
            f"{report.stage}: all {report.items_in} items failed (first: {first[0]}: {first[1]}); "
            f"see {report.stage} report.json"
        )


class ItemIndex:
    """Per-item record of the input key each output was made from.

    `record` appends one JSON line to a journal (`index.json.log`), so recording is O(1) and a crash loses at most
    the line being written; loading replays the journal over the last snapshot and compacts it into `index.json`.
    """

    def __init__(self, path: Path):
        self.path = path
        self.journal = path.with_name(path.name + ".log")
        self.entries: dict[str, dict[str, Any]] = read_json(path, {}) or {}
        if self.journal.exists():
            self._replay()
            self.save()

    def _replay(self) -> None:
        for line in self.journal.read_text().splitlines():
            try:
                item_id, entry = json.loads(line)
            except ValueError:  # a line cut short by a crash: that item is simply redone
                continue
            if entry is None:
                self.entries.pop(item_id, None)
            else:
                self.entries[item_id] = entry

    def fresh(self, item_id: str, key: str, base: Path) -> dict[str, Any] | None:
        """The entry if `item_id` was made from `key` and its outputs (relative to `base`) all exist."""
        entry = self.entries.get(item_id)
        if not entry or entry.get("key") != key:
            return None
        if all((base / p).exists() for p in entry.get("outputs", [])):
            return entry
        return None

    def record(self, item_id: str, key: str, outputs: list[str] | None = None, **extra: Any) -> None:
        entry = {"key": key, "outputs": outputs or [], **extra}
        self.entries[item_id] = entry
        self.journal.parent.mkdir(parents=True, exist_ok=True)
        with open(self.journal, "a") as f:
            f.write(json.dumps([item_id, entry], sort_keys=True, default=str) + "\n")

    def prune(self, keep: set[str], base: Path) -> list[str]:
        """Forget items no longer in the input set and delete their outputs. Returns the removed ids."""
        gone = [i for i in self.entries if i not in keep]
        for item_id in gone:
            for rel in self.entries[item_id].get("outputs", []):
                (base / rel).unlink(missing_ok=True)
            del self.entries[item_id]
        self.save()
        return gone

    def save(self) -> None:
        """Write the snapshot and drop the journal it now contains."""
        write_json(self.path, self.entries)
        self.journal.unlink(missing_ok=True)


def slug(text: str, max_len: int = 40) -> str:
    """Filesystem- and id-safe form of a title or file stem."""
    keep = "".join(ch.lower() if ch.isalnum() else "-" for ch in text)
    while "--" in keep:
        keep = keep.replace("--", "-")
    return keep.strip("-")[:max_len] or "item"


def piece_id(item_id: str) -> str:
    """The source piece an item came from: strips segment and augmentation suffixes."""
    return item_id.split(C.AUG_SEP)[0].split(C.SEGMENT_SEP)[0]
