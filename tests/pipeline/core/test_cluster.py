"""Item-wise stages on a Dask cluster: the same outputs as local processes, retries of dead workers, clear errors."""

from __future__ import annotations

import hashlib
import json
import os
import socket
from pathlib import Path

import pytest

pytest.importorskip("distributed")

import dask
from distributed import LocalCluster

from pipeline.core import cluster
from pipeline.core.config import config_from_dict
from pipeline.core.graph import run_stage
from pipeline.core.items import ItemIndex, ItemResult, Job, StageReport, run_jobs
from pipeline.services import unreachable
from tests.pipeline.data.test_tokenize import make_corpus, tiny_config

pytestmark = pytest.mark.slow  # each test starts a cluster of worker processes (~10-30 s on 2 cores)


def _digests(root: Path) -> dict[str, str]:
    """sha256 of every output file under `root`, but the report (timings) and the index files (entry order)."""
    skip = {"report.json", "index.json", "index.json.log", "vocab.json"}  # vocab.json: BPE's training time
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name not in skip
    }


def test_tokenize_on_a_two_worker_cluster_equals_local_processes(tmp_path):
    local, remote = tmp_path / "local", tmp_path / "remote"
    make_corpus(local)
    make_corpus(remote)
    local_report = run_stage("tokenize", tiny_config(local))
    with LocalCluster(n_workers=2, threads_per_worker=1, host="127.0.0.1", dashboard_address=None) as lc:
        cfg = tiny_config(remote).model_copy(deep=True)
        project = cfg.project.model_copy(update={"executor": "dask", "cluster_address": lc.scheduler_address})
        cfg = cfg.model_copy(update={"project": project})
        first = run_stage("tokenize", cfg)
        again = run_stage("tokenize", cfg)
    assert sorted(first.processed) == sorted(local_report.processed) and first.processed
    assert not first.failed and first.retries == 0
    assert _digests(remote / "tokenize") == _digests(local / "tokenize")  # same windows, cache, tokenizer, config
    indexes = [ItemIndex(d / "tokenize/cache/index.json").entries for d in (local, remote)]
    assert indexes[0] == indexes[1]
    vocab = [json.loads((d / "tokenize/vocab.json").read_text()) for d in (local, remote)]
    assert vocab[0]["sha256"] == vocab[1]["sha256"] and vocab[0]["vocab_hash"] == vocab[1]["vocab_hash"]
    assert again.processed == [] and sorted(again.cached) == sorted(first.processed)  # incremental per item


def _build(item_id: str, out_dir: Path, dies: str) -> ItemResult:
    """Write one output; `dies`: "once" kills its worker on the first attempt, "always" on every attempt."""
    marker = out_dir / f"{item_id}.attempted"
    if dies == "always" or (dies == "once" and not marker.exists()):
        marker.touch()
        os._exit(1)  # the worker process dies under the item, as with an OOM kill
    (out_dir / f"{item_id}.txt").write_text(item_id)
    return ItemResult(outputs=[f"{item_id}.txt"])


def test_items_of_a_dead_worker_are_retried_and_never_recorded_as_done(tmp_path):
    project = config_from_dict({"project": {"workers": 2, "executor": "dask"}}).project
    index = ItemIndex(tmp_path / "index.json")
    report = StageReport("t")
    jobs = [Job(i, "k", _build, (i, tmp_path, dies)) for i, dies in (("a", ""), ("b", "once"), ("c", "always"))]
    run_jobs(jobs, index, tmp_path, report, project)
    allowed = dask.config.get("distributed.scheduler.allowed-failures")  # 3: then the scheduler gives up on c
    assert sorted(report.processed) == ["a", "b"]  # b ran again on another worker
    assert list(report.failed) == ["c"] and "KilledWorker" in report.failed["c"]
    # b once and c `allowed` times; an item that merely waited on a dying worker is retried (and counted) too
    assert report.retries >= 1 + allowed
    assert sorted(index.entries) == ["a", "b"]  # c is not recorded: the next run tries it again
    assert f"{report.retries} retried" in report.summary()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_an_address_nobody_answers_fails_once_before_any_work(tmp_path, monkeypatch, midi_file, tune):
    monkeypatch.setattr(cluster, "CONNECT_TIMEOUT_S", 2)
    address = f"tcp://127.0.0.1:{_free_port()}"
    params = {"data_dir": str(tmp_path / "data"), "executor": "dask", "cluster_address": address}
    cfg = config_from_dict({"project": params})
    problems = unreachable(cfg)  # what `jam run` checks before the flow starts
    assert len(problems) == 1 and "project.cluster_address" in problems[0] and address in problems[0]
    jobs = [Job("a", "k", _build, ("a", tmp_path, ""))]
    with pytest.raises(cluster.ClusterError, match="no Dask scheduler answers"):
        run_jobs(jobs, ItemIndex(tmp_path / "index.json"), tmp_path, StageReport("t"), cfg.project)
    assert not (tmp_path / "a.txt").exists() and not (tmp_path / "index.json.log").exists()
