"""Stage outputs survive the machine: machine A runs a stage and pushes it to the DVC remote on (moto) S3; machine B,
a fresh clone, pulls it and the stage finds every item done."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from pipeline import datasync
from pipeline.core import graph
from pipeline.core.config import config_from_dict

REPO = Path(__file__).resolve().parents[2]


def _clone(dest: Path) -> Path:
    subprocess.run(["git", "clone", "--quiet", str(REPO), str(dest)], check=True, timeout=120)
    return dest


def test_a_fresh_machine_pulls_finished_stages_and_redoes_nothing(spot_services, tmp_path, monkeypatch):
    cfg, _ = spot_services
    tree = cfg.model_dump(mode="json")
    tree["project"].update(data_dir="data", workers=1)
    tree["demo"].update(players={"solo": {"composers": ["chopin", "joplin"], "max_pieces": 2}}, excerpt_s=4.0)
    tree["services"]["dvc_remote"] = f"{cfg.services.dvc_remote}/{tmp_path.name}"  # this test's own prefix
    cfg = config_from_dict(tree)

    machine_a = _clone(tmp_path / "a")
    monkeypatch.chdir(machine_a)
    datasync.configure(cfg, machine_a)
    assert datasync.pull(cfg, ["demo"], machine_a) == []  # an empty remote: nothing to pull, no error
    first = graph.run_stage("demo", cfg)
    assert len(first.processed) == 2
    datasync.push(cfg, "demo", machine_a)

    machine_b = _clone(tmp_path / "b")
    monkeypatch.chdir(machine_b)
    datasync.configure(cfg, machine_b)
    assert datasync.pull(cfg, ["demo", "base"], machine_b) == ["demo"]  # base never ran on A: not on the remote
    report = "data/demo/report.json"  # dvcignored (timings), travels beside the lock: later stages read reports
    assert (machine_b / report).read_bytes() == (machine_a / report).read_bytes()
    again = graph.run_stage("demo", cfg)
    assert len(again.processed) == 0 and len(again.cached) == 2
    wavs = sorted(p.name for p in (machine_b / "data" / "demo" / "audio" / "solo").iterdir())
    assert wavs == sorted(p.name for p in (machine_a / "data" / "demo" / "audio" / "solo").iterdir()) and len(wavs) == 2


def test_remote_needs_a_dvc_repository_and_the_tracked_data_dir(tmp_path):
    cfg = config_from_dict({"services": {"dvc_remote": "s3://b/dvc"}, "project": {"data_dir": str(tmp_path)}})
    with pytest.raises(datasync.DataSyncError, match="not a DVC repository"):
        datasync.configure(cfg, tmp_path)
    with pytest.raises(datasync.DataSyncError, match=r"project\.data_dir"):
        datasync.configure(cfg, REPO)
    assert not datasync.enabled(config_from_dict({}))
