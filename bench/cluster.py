"""Data-stage throughput on 1 vs 2 workers, local processes vs a local Dask cluster, side by side. Prints JSON.

    python bench/cluster.py [--pieces 48] [--notes 1500] [--rounds 2]

The item-wise part of the tokenize stage (`encode_items`: parse, encode, round-trip check, one .npy per piece)
over synthetic pieces, with the tokenizer trained once beforehand; every setting starts from an empty cache and
the settings take turns (`--rounds` times) so a shared machine's load falls on all of them. Seconds include
starting the workers (a process pool, or a LocalCluster of as many workers), as a stage run does.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SETTINGS = {"processes_1": ("processes", 1), "processes_2": ("processes", 2), "dask_1": ("dask", 1),
            "dask_2": ("dask", 2)}  # fmt: skip


def make_pieces(folder: Path, pieces: int, notes: int) -> list[Path]:
    import numpy as np
    from symusic import Note, Score, Track

    rng = np.random.default_rng(0)
    paths = []
    for i in range(pieces):
        score, track, tick = Score(480), Track(name="piano", program=0), 0
        for _ in range(notes):
            tick += int(rng.integers(30, 400))
            duration, pitch, velocity = (int(rng.integers(*r)) for r in ((60, 900), (30, 96), (30, 110)))
            track.notes.append(Note(tick, duration, pitch, velocity))
        score.tracks.append(track)
        paths.append(folder / f"piece{i:03d}.mid")
        score.dump_midi(str(paths[-1]))
    return paths


def one_run(work: Path, tok_dir: Path, paths: list[Path], executor: str, workers: int) -> tuple[float, int]:
    from pipeline.core.config import config_from_dict
    from pipeline.core.items import StageReport
    from pipeline.data.tokenize import Item, encode_items

    out = work / f"out-{executor}-{workers}"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    shutil.copy(tok_dir / "tokenizer.json", out / "tokenizer.json")
    project = config_from_dict({"project": {"workers": workers, "executor": executor}}).project
    items = [Item("base", "train", p.stem, p) for p in paths]
    report = StageReport("tokenize")
    t0 = time.perf_counter()
    encode_items(items, out, report, project)
    seconds = time.perf_counter() - t0
    assert not report.failed, report.failed
    return seconds, len(report.processed)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pieces", type=int, default=48)
    ap.add_argument("--notes", type=int, default=1500, help="notes per piece (~6 minutes of piano at 4 notes/s)")
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    os.environ.setdefault("TQDM_DISABLE", "1")
    from pipeline.core.config import TokenizeConfig
    from pipeline.data.tokenize import make_tokenizer, train_bpe

    work = Path(tempfile.mkdtemp(prefix="jam-bench-cluster-"))
    try:
        (work / "midi").mkdir()
        paths = make_pieces(work / "midi", args.pieces, args.notes)
        tokenizer = make_tokenizer(TokenizeConfig())
        train_bpe(tokenizer, paths[:8], TokenizeConfig(), 0)
        tokenizer.save(work / "tokenizer.json")
        times: dict[str, list[float]] = {name: [] for name in SETTINGS}
        for _ in range(args.rounds):
            for name, (executor, workers) in SETTINGS.items():
                seconds, done = one_run(work, work, paths, executor, workers)
                assert done == args.pieces
                times[name].append(seconds)
        median = {name: statistics.median(t) for name, t in times.items()}
        result = {
            "machine": f"{platform.machine()}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f} (1 min)",
            "pieces": args.pieces, "notes_per_piece": args.notes, "rounds": args.rounds,
            "seconds": {k: [round(x, 2) for x in v] for k, v in times.items()},
            "pieces_per_s": {k: round(args.pieces / v, 2) for k, v in median.items()},
            "speedup_2_over_1": {e: round(median[f"{e}_1"] / median[f"{e}_2"], 2) for e in ("processes", "dask")},
            "dask_over_processes": {w: round(median[f"processes_{w}"] / median[f"dask_{w}"], 2) for w in (1, 2)},
        }  # fmt: skip
        print(json.dumps(result, indent=2))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
