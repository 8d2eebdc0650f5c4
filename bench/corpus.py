"""A corpus bigger than memory: the base stage's listing, hashing and item index over a folder of synthetic MIDI
files, and the tokenize stage's window writer (streamed into a memory-mapped .npy vs concatenated in memory).
Prints JSON: seconds and heap peak (tracemalloc, MB) per phase, and per 10k items.

    python bench/corpus.py [--items 100000] [--pieces 2000] [--tokens 8000] [--dir DIR]

Phases over `--items` files (`pipeline.data.base._folder_jobs`, `pipeline.core.items.run_jobs`):
  list_and_hash   rglob + sort + sha256 of every file + one Job each (what every run of the base stage does)
  first_run       the driver records every item in the index journal (the jobs' outputs are made beforehand,
                  so this is the driver's own cost, not MIDI parsing or file creation)
  index_load      the next run opens the index: journal replayed, snapshot written
  cached_rerun    nothing changed: every item checked fresh (key + output exists) and reported cached
Windows over `--pieces` synthetic sequences of ~`--tokens` ids (`pipeline.data.windows._write_split`):
  streamed (memory-mapped, the stage's writer) vs in_memory (the former np.concatenate + np.save), same bytes.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import struct
import sys
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # `python bench/corpus.py`: bench.scratch and pipeline from this checkout
PER = 10_000  # figures are also given per this many items


def midi_bytes(i: int, notes: int = 16) -> bytes:
    """A valid one-track type-0 MIDI file whose notes depend on `i` (so every file hashes differently)."""
    events = b""
    for k in range(notes):
        pitch = 36 + (i * 7 + k * 5) % 60
        events += b"\x00" + bytes([0x90, pitch, 80]) + b"\x60" + bytes([0x80, pitch, 0])
    events += b"\x00\xff\x2f\x00"
    return b"MThd" + struct.pack(">IHHH", 6, 0, 1, 480) + b"MTrk" + struct.pack(">I", len(events)) + events


def make_folder(root: Path, n: int) -> None:
    for i in range(n):
        sub = root / f"set{i // 1000:03d}"  # nested like real corpora (MAESTRO: one folder per year)
        if i % 1000 == 0:
            sub.mkdir(parents=True, exist_ok=True)
        (sub / f"piece{i:06d}.mid").write_bytes(midi_bytes(i))


def measured(fn: Callable[[], Any]) -> tuple[Any, dict[str, float]]:
    tracemalloc.start()
    t0 = time.perf_counter()
    out = fn()
    seconds = time.perf_counter() - t0
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return out, {"s": round(seconds, 3), "heap_peak_mb": round(peak / 2**20, 2)}


def _made(src: Path, dest: Path):
    """A job whose output already exists (made before timing): what is timed is the driver's own work."""
    from pipeline.core.items import ItemResult

    return ItemResult(outputs=[f"midi/{dest.name}"])


def bench_index(root: Path, out_dir: Path, n: int) -> dict[str, Any]:
    from pipeline.core import constants as C
    from pipeline.core.config import config_from_dict
    from pipeline.core.items import ItemIndex, Job, StageReport, run_jobs
    from pipeline.data.base import _folder_jobs

    section = config_from_dict({"base": {"source": "folder", "path": str(root), "max_pieces": n}}).base
    jobs, phases = None, {}
    jobs, phases["list_and_hash"] = measured(lambda: _folder_jobs(section, out_dir, StageReport("base")))
    (out_dir / "midi").mkdir(parents=True)
    for job in jobs:
        job.args[1].touch()
    cheap = [Job(j.item_id, j.key, _made, j.args) for j in jobs]
    index_path = out_dir / C.INDEX_NAME
    _, phases["first_run"] = measured(lambda: run_jobs(cheap, ItemIndex(index_path), out_dir, StageReport("b"), 1))
    index, phases["index_load"] = measured(lambda: ItemIndex(index_path))
    report = StageReport("base")
    _, phases["cached_rerun"] = measured(lambda: run_jobs(jobs, index, out_dir, report, 1))
    assert len(report.cached) == len(jobs) and not report.processed
    return phases


def bench_windows(work: Path, pieces: int, tokens: int) -> dict[str, Any]:
    from pipeline.core.config import TokenizeConfig
    from pipeline.data.windows import _framed, _write_split, window_ids

    rng = np.random.default_rng(0)
    seqs = []
    for i in range(pieces):
        path = work / "cache" / f"{i}.npy"
        path.parent.mkdir(parents=True, exist_ok=True)
        np.save(path, rng.integers(4, 1000, int(tokens * rng.uniform(0.5, 1.5))).astype(np.int32))
        seqs.append(path)
    tc, ids = TokenizeConfig(), {"pad_id": 0, "bos_id": 1, "eos_id": 2}

    def in_memory() -> None:  # the writer before: every window of the split held, then concatenated
        parts = [window_ids(_framed(np.load(p), ids), tc.max_seq_len, tc.overlap, 0) for p in seqs]
        np.save(work / "in_memory.npy", np.concatenate(parts))

    _, streamed = measured(lambda: _write_split(work / "streamed.npy", seqs, tc, ids))
    _, before = measured(in_memory)
    same = (work / "streamed.npy").read_bytes() == (work / "in_memory.npy").read_bytes()
    size_mb = (work / "streamed.npy").stat().st_size / 2**20
    return {"pieces": pieces, "file_mb": round(size_mb, 1), "identical_bytes": same, "streamed": streamed,
            "in_memory": before,
            "heap_ratio_in_memory_to_streamed": round(before["heap_peak_mb"] / max(streamed["heap_peak_mb"], 1e-3), 1),
            }  # fmt: skip


def per_10k(phases: dict[str, dict[str, float]], n: int) -> dict[str, dict[str, float]]:
    return {k: {"s": round(v["s"] * PER / n, 3), "heap_peak_mb": round(v["heap_peak_mb"] * PER / n, 2)}
            for k, v in phases.items()}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--items", type=int, default=100_000)
    ap.add_argument("--pieces", type=int, default=2000)
    ap.add_argument("--tokens", type=int, default=8000, help="mean ids per piece (a few minutes of piano)")
    ap.add_argument("--dir", type=Path, default=None, help="scratch folder (default: a temporary one, removed)")
    args = ap.parse_args()
    from bench.scratch import scratch_dir

    with scratch_dir(args.dir, "jam-corpus-") as work:
        t0 = time.perf_counter()
        make_folder(work / "folder", args.items)
        made_s = time.perf_counter() - t0
        phases = bench_index(work / "folder", work / "base", args.items)
        result = {
            "machine": f"{platform.machine()}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}",
            "items": args.items,
            "make_files_s": round(made_s, 1),
            "index": phases,
            "index_per_10k_items": per_10k(phases, args.items),
            "windows": bench_windows(work / "windows", args.pieces, args.tokens),
        }
        print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
