"""run_jobs: cached items skipped, recorded vs transient failures, the per-process initializer."""

from __future__ import annotations

from pathlib import Path

from pipeline.core.items import ItemIndex, ItemResult, Job, StageReport, TransientError, run_jobs

CALLS: list[str] = []
SETUP: list[int | None] = []


def _setup(threads: int | None, tag: str) -> None:
    SETUP.append(threads)
    CALLS.append(f"setup:{tag}")


def _build(item_id: str, out_dir: Path, fail: str) -> ItemResult:
    CALLS.append(item_id)
    if fail == "transient":
        raise TransientError("input missing")
    if fail == "error":
        raise ValueError("bad bytes")
    (out_dir / f"{item_id}.txt").write_text(item_id)
    return ItemResult(outputs=[f"{item_id}.txt"], stats={"n": 1})


def _run(tmp_path: Path) -> StageReport:
    report = StageReport("t")
    index = ItemIndex(tmp_path / "index.json")
    jobs = [Job(i, "k1", _build, (i, tmp_path, fail)) for i, fail in (("a", ""), ("b", "transient"), ("c", "error"))]
    run_jobs(jobs, index, tmp_path, report, workers=1, initializer=_setup, initargs=("x",))
    return report


def test_transient_failures_are_reported_not_recorded(tmp_path):
    CALLS.clear()
    first = _run(tmp_path)
    assert CALLS == ["setup:x", "a", "b", "c"] and first.processed == ["a"]
    assert first.failed == {"b": "input missing", "c": "ValueError: bad bytes"}

    CALLS.clear()
    again = _run(tmp_path)
    assert CALLS == ["setup:x", "b"]  # only the transient one is tried again; a and c (same key) are cached
    assert sorted(again.cached) == ["a", "c"] and again.failed == first.failed


def test_initializer_not_called_when_all_cached(tmp_path):
    report = StageReport("t")
    index = ItemIndex(tmp_path / "index.json")
    jobs = [Job("a", "k", _build, ("a", tmp_path, ""))]
    run_jobs(jobs, index, tmp_path, report, workers=1)
    SETUP.clear()
    run_jobs(jobs, index, tmp_path, StageReport("t"), workers=1, initializer=_setup, initargs=("y",))
    assert SETUP == []  # a fully cached run sets nothing up (no model loaded)
