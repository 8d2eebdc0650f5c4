"""The per-item driver every item-wise stage uses: the item index, the stage report, workers, failures.

A stage builds one `Job` per item (its id, a cache key hashing everything the item's output depends on: input
content, the stage's params, the code version, and the picklable call that builds it) and hands them to `run_jobs`.
Same key and outputs still on disk: skipped. A failing item becomes a one-line message in the report and the index
(same key: not retried, still reported) while the rest go on; a `TransientError` (input missing, network down,
worker crashed) is reported but not recorded, so the next run tries again. Workers are spawned processes, each set
up once by an optional initializer (a transcription model, a tokenizer) that is told its share of the cores; with
`project.executor: dask` they are a Dask cluster's workers instead (`pipeline.core.cluster`), same jobs, same rules.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from pipeline.core import constants as C
from pipeline.core.files import read_json, write_json, write_text


@dataclass
class StageReport:
    """What a stage did this run. Written as `report.json` beside the stage's outputs."""

    stage: str
    items_in: int = 0
    processed: list[str] = field(default_factory=list)  # did work this run
    cached: list[str] = field(default_factory=list)  # up to date, no work
    failed: dict[str, str] = field(default_factory=dict)  # item id -> clear error message
    retries: int = 0  # items rescheduled on another worker because theirs died (Dask executor)
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
        if self.retries:
            parts.append(f"{self.retries} retried")
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
        self._journal_dir_made = False
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
        if not self._journal_dir_made:  # once: a stat per item is half of recording one (bench/corpus.py)
            self.journal.parent.mkdir(parents=True, exist_ok=True)
            self._journal_dir_made = True
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
        """Write the snapshot and drop the journal it now contains.

        Compact JSON: `json` encodes it in C, 3.5x faster than indented (Python) at 100k items (bench/corpus.py).
        """
        write_text(self.path, json.dumps(self.entries, sort_keys=True, separators=(",", ":"), default=str) + "\n")
        self.journal.unlink(missing_ok=True)


class ItemError(Exception):
    """A failure whose message is already one clear line for the report (no exception type put in front)."""


class TransientError(ItemError):
    """A failure that says nothing about the item's inputs (input missing, network down, worker crashed).

    Reported but not recorded in the index, so the next run tries the item again.
    """


@dataclass
class ItemResult:
    """What one item produced: output paths relative to the stage dir, filtered-out parts, per-item figures."""

    outputs: list[str] = field(default_factory=list)
    dropped: dict[str, str] = field(default_factory=dict)  # item or sub-item id -> reason
    stats: dict[str, float] = field(default_factory=dict)  # summed over items into the report
    items: list[str] | None = None  # ids reported as processed/cached when one job yields several; None: its id
    failed: dict[str, str] = field(default_factory=dict)  # sub-items that failed: the job is redone next run
    extra: dict[str, Any] = field(default_factory=dict)  # more fields for the index entry (acquire's manifest rows)


@dataclass
class Job:
    """One item to (re)build: its id, cache key, and the picklable call that builds it."""

    item_id: str
    key: str
    fn: Callable[..., ItemResult]
    args: tuple[Any, ...]
    label: str | None = None  # the id a failure of the whole job is reported under (default: item_id)

    @property
    def name(self) -> str:
        return self.label or self.item_id


@dataclass(frozen=True)
class _Failure:
    message: str
    transient: bool


Initializer = Callable[..., None]  # initializer(threads, *initargs); threads: cores per worker, None inline


def _call(job: Job) -> ItemResult | _Failure:
    """Run a job; a failure comes back as a one-line message so the pool and the other items go on."""
    try:
        return job.fn(*job.args)
    except ItemError as err:
        return _Failure(_one_line(str(err)), isinstance(err, TransientError))
    except Exception as err:
        return _Failure(_one_line(f"{type(err).__name__}: {err}"), False)


def _one_line(text: str) -> str:
    return text.replace("\n", " ")[:500]


def _init_process(initializer: Initializer | None, threads: int, initargs: tuple[Any, ...]) -> None:
    os.environ.setdefault("TQDM_DISABLE", "1")  # one bar, in the parent
    if initializer is not None:
        initializer(threads, *initargs)


def _crashed(err: BaseException) -> _Failure:
    """A worker that died under an item (BrokenProcessPool, KilledWorker) fails that item, not the stage."""
    return _Failure(_one_line(f"worker failed: {type(err).__name__}: {err}"), True)


def _results(
    jobs: list[Job], workers: int, initializer: Initializer | None, initargs: tuple[Any, ...]
) -> Iterator[tuple[Job, ItemResult | _Failure]]:
    if not jobs:
        return
    n = min(workers, len(jobs), os.cpu_count() or 1)
    if n <= 1:
        if initializer is not None:  # only once there is work: a fully cached run loads no model
            initializer(None, *initargs)
        for job in jobs:
            yield job, _call(job)
        return
    threads = max(1, (os.cpu_count() or 1) // n)  # n processes share the cores
    # spawn, not fork: drivers run inside Prefect/MLflow processes (and beside onnxruntime) whose threads hold locks
    ctx = multiprocessing.get_context("spawn")
    init_args = (initializer, threads, initargs)
    with ProcessPoolExecutor(n, mp_context=ctx, initializer=_init_process, initargs=init_args) as pool:
        futures = {pool.submit(_call, job): job for job in jobs}
        for fut in as_completed(futures):
            try:
                yield futures[fut], fut.result()
            except Exception as err:
                yield futures[fut], _crashed(err)


def _cluster_results(
    jobs: list[Job], project: Any, initializer: Initializer | None, initargs: tuple[Any, ...], out_dir: Path,
    report: StageReport,
) -> Iterator[tuple[Job, ItemResult | _Failure]]:  # fmt: skip
    if not jobs:
        return
    from pipeline.core import cluster  # distributed is imported only when a stage uses it

    n = min(project.workers, len(jobs), os.cpu_count() or 1)  # a local cluster's size, as the pool's
    for job, value in cluster.results(jobs, project, n, _call, initializer, initargs, out_dir, report):
        yield job, _crashed(value) if isinstance(value, BaseException) else value


def _forget_stale(index: ItemIndex, item_id: str, keep: list[str], base: Path) -> None:
    """Delete outputs an item made last time but not this time (fewer segments, now dropped or failing)."""
    for rel in index.entries.get(item_id, {}).get("outputs", []):
        if rel not in keep:
            (base / rel).unlink(missing_ok=True)


def _report_cached(job: Job, entry: dict[str, Any], report: StageReport) -> None:
    report.cached.extend(entry.get("items", [job.item_id]))
    if entry.get("error"):
        report.failed[job.name] = entry["error"]
    report.dropped.update(entry.get("dropped", {}))


def _record(job: Job, result: ItemResult | _Failure, index: ItemIndex, out_dir: Path, report: StageReport) -> None:
    if isinstance(result, _Failure):
        report.failed[job.name] = result.message
        if not result.transient:  # deterministic for these inputs and params: don't retry every run
            _forget_stale(index, job.item_id, [], out_dir)
            index.record(job.item_id, job.key, error=result.message)
        return
    _forget_stale(index, job.item_id, result.outputs, out_dir)
    report.processed.extend(result.items if result.items is not None else [job.item_id])
    report.dropped.update(result.dropped)
    report.failed.update(result.failed)
    key = f"incomplete:{job.key}" if result.failed else job.key  # not fresh: failed parts are tried again
    extra = {"items": result.items} if result.items is not None else {}
    extra |= result.extra
    index.record(job.item_id, key, outputs=result.outputs, dropped=result.dropped, stats=result.stats, **extra)


def run_jobs(
    jobs: list[Job],
    index: ItemIndex,
    out_dir: Path,
    report: StageReport,
    workers: int | Any,
    initializer: Initializer | None = None,
    initargs: tuple[Any, ...] = (),
) -> None:
    """The driver loop: skip fresh items, build the rest (in `workers` processes, or on a cluster), record everything.

    Cached items re-report their stored error or dropped reasons, so report.json always describes the whole
    input set, not just this run's work.

    Args:
        workers: a number of local processes, or the `project` params section: `project.workers` local processes,
            or with `executor: dask` the Dask cluster at `cluster_address` (a local one of `workers` without).
        initializer: sets up a process before its first job, as `initializer(threads, *initargs)`: once in each
            pool worker (threads = its share of the cores), or once inline when there is work (threads = None,
            the library's default). It must be picklable (a module-level function).
    """
    report.items_in += len(jobs)
    pending = []
    for job in jobs:
        entry = index.fresh(job.item_id, job.key, out_dir)
        if entry is None:
            pending.append(job)
        else:
            _report_cached(job, entry, report)
    bar = tqdm(total=len(pending), desc=report.stage, disable=None, unit="item")
    if isinstance(workers, int):
        results = _results(pending, workers, initializer, initargs)
    elif workers.executor == "dask":
        results = _cluster_results(pending, workers, initializer, initargs, out_dir, report)
    else:
        results = _results(pending, workers.workers, initializer, initargs)
    for job, result in results:
        bar.update()
        _record(job, result, index, out_dir, report)
    bar.close()


def summed_stats(index: ItemIndex, ids: Iterable[str]) -> dict[str, float]:
    """Per-item stats (as recorded in the index) summed over `ids`."""
    total: dict[str, float] = {}
    for item_id in ids:
        for name, value in index.entries.get(item_id, {}).get("stats", {}).items():
            total[name] = round(total.get(name, 0) + value, 3)
    return total


def count_outputs(index: ItemIndex, ids: Iterable[str]) -> int:
    """Number of output files the index holds for `ids`."""
    return sum(len(index.entries.get(i, {}).get("outputs", [])) for i in ids)


def run_item_stage(jobs: list[Job], out_dir: Path, report: StageReport, workers: int | Any) -> ItemIndex:
    """The usual shape of a stage over independent items: forget vanished items, build the rest, count outputs.

    Returns the stage's index, for per-item stats (`summed_stats`) the caller adds to the report.
    """
    index = ItemIndex(out_dir / C.INDEX_NAME)
    ids = [j.item_id for j in jobs]
    index.prune(set(ids), out_dir)
    run_jobs(jobs, index, out_dir, report, workers)
    report.outputs = count_outputs(index, ids)
    return index


def finish_stage(report: StageReport, out_dir: Path, config_json: str) -> StageReport:
    """Write report.json and the resolved config; raise `AllItemsFailed` when nothing survived."""
    report.finish(out_dir, config_json)
    raise_if_all_failed(report)
    return report
