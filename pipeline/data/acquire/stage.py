"""The acquire stage: every source through the per-item driver, then the manifest.

One job per source, cached by `source_key`: a file by its content hash, a URL by the URL itself, so a re-run touches
neither the decoder nor the network. A file that fails is recorded (same bytes fail the same way); a URL that
fails is not (the network may be back next run) and keeps last run's items, so downstream stages don't prune them.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from pipeline.core import constants as C
from pipeline.core.config import Config, section_json
from pipeline.core.items import ItemIndex, ItemResult, Job, StageReport, TransientError, raise_if_all_failed, run_jobs
from pipeline.data.acquire.manifest import Row, good_rows, write_manifest
from pipeline.data.acquire.sources import (
    AcquireError,
    Source,
    expand_sources,
    make_adapter,
    one_line,
    source_key,
)

NETWORK_WORKERS = 1  # downloads one at a time: polite to hosts, and yt-dlp appends to one archive file


def acquire_source(source: Source, cfg: Config, out_dir: Path) -> list[Row]:
    """Fetch or convert one source into `out_dir`.

    Args:
        source: from `expand_sources`.
        cfg: the project config (`cfg.acquire` is used).
        out_dir: the stage folder (`data/acquire`).

    Returns:
        Manifest rows, one per item (a playlist yields several). A row with an `error` key is a failed playlist
        entry, one with a `dropped` key was filtered out (too long); neither goes into the manifest.

    Raises:
        AcquireError: the source as a whole failed (bad file, unreachable or unsupported URL).
    """
    try:
        return make_adapter(source.kind)(source, cfg, out_dir)
    except (OSError, subprocess.SubprocessError) as err:
        raise AcquireError(one_line(err)) from None


def acquire_item(source: Source, cfg: Config, out_dir: Path) -> ItemResult:
    """`acquire_source` as a driver job: its rows become the job's items, outputs, dropped and failed parts."""
    try:
        rows = acquire_source(source, cfg, out_dir)
    except AcquireError as err:
        if source.kind in ("audio", "midi"):
            raise  # deterministic: same bytes fail the same way, so the failure is cached
        raise TransientError(str(err)) from None
    good = good_rows(rows)
    return ItemResult(
        outputs=_outputs(good),
        dropped={r["id"]: r["dropped"] for r in rows if "dropped" in r},
        items=[r["id"] for r in good],
        failed={r["id"]: r["error"] for r in rows if "error" in r},  # a failed entry: the URL is listed again
        extra={"rows": rows},
    )


def _outputs(rows: list[Row]) -> list[str]:
    """Stored files of the rows, relative to the stage folder."""
    layout = {"audio": "audio/{}.wav", "midi": "midi/{}.mid"}
    return [layout[r["kind"]].format(r["id"]) for r in rows]


def _job(source: Source, cfg: Config, out_dir: Path) -> Job:
    key = source_key(source, cfg) if source.kind != "invalid" else ""  # invalid: never fresh
    label = source.location if source.kind == "url" else None  # a URL's items are only known once listed
    return Job(source.item_id, key, acquire_item, (source, cfg, out_dir), label=label)


def _stored_rows(sources: list[Source], index: ItemIndex, out_dir: Path, report: StageReport) -> list[Row]:
    """The good rows every source holds now, each with its source's style (the config's today, not the cached
    one's: moving a folder to another style re-labels its items without fetching them again); a URL that failed
    this run keeps last run's rows (reported cached)."""
    rows = []
    for source in sources:
        entry = index.entries.get(source.item_id) or {}
        if source.kind == "invalid" or not all((out_dir / o).exists() for o in entry.get("outputs", [])):
            continue
        good = good_rows(entry.get("rows", []))
        if source.kind == "url" and source.location in report.failed:
            report.cached.extend(r["id"] for r in good)
        rows.extend({**r, "style": source.style} for r in good)
    return rows


def _prune(index: ItemIndex, keep: set[str], out_dir: Path) -> list[str]:
    """Prune vanished sources, sparing files another kept source also produced (a video in two playlists)."""
    kept = {o for i, e in index.entries.items() if i in keep for o in e.get("outputs", [])}
    for item_id, entry in index.entries.items():
        if item_id not in keep:
            entry["outputs"] = [o for o in entry.get("outputs", []) if o not in kept]
    return index.prune(keep, out_dir)


def run_acquire(cfg: Config, inputs: dict[str, Path], out_dir: Path) -> StageReport:
    """Acquire every style's sources into `data/acquire/`; incremental per source. Manifest rows name their style.

    Files are decoded on `project.workers` processes (or the Dask cluster, `project.executor`), URLs downloaded one
    at a time in this process (`NETWORK_WORKERS`).

    Returns:
        The stage report (also written to `data/acquire/report.json`).

    Raises:
        AllItemsFailed: no source yielded anything.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    report = StageReport(stage="acquire")
    index = ItemIndex(out_dir / C.INDEX_NAME)
    sources = expand_sources(cfg)
    files = [_job(s, cfg, out_dir) for s in sources if s.kind != "url"]
    urls = [_job(s, cfg, out_dir) for s in sources if s.kind == "url"]
    run_jobs(files, index, out_dir, report, cfg.project)
    run_jobs(urls, index, out_dir, report, NETWORK_WORKERS)
    rows = _stored_rows(sources, index, out_dir, report)
    pruned = _prune(index, {s.item_id for s in sources}, out_dir)
    write_manifest(rows, out_dir)
    report.items_in = len({*report.processed, *report.cached, *report.failed, *report.dropped})
    report.outputs = len({r["id"] for r in rows})
    report.stats = {
        "sources": len(sources),
        "styles": {name: sum(1 for r in rows if r["style"] == name) for name in cfg.styles},
        "pruned_sources": pruned,
        "audio_s": round(sum(r.get("duration_s") or 0 for r in rows if r["kind"] == "audio"), 1),
    }
    report.finish(out_dir, section_json(cfg.acquire))
    raise_if_all_failed(report)
    return report
