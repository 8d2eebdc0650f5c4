"""`jam services`: the real moto S3, MLflow and Prefect servers on loopback, used through the project's own code."""

from __future__ import annotations

import json
from pathlib import Path

import psutil
import pytest

from pipeline.core.config import Config
from pipeline.services import ServicesError, check_reachable, down, plan, status, unreachable, up
from tests.conftest import AWS_ENV, BUCKET, free_ports, spot_cfg


def test_checkpoint_round_trips_through_moto_s3(spot_services):
    from pipeline.train.checkpoint import store_for

    cfg, _ = spot_services
    store = store_for(cfg, "finetune", "f" * 64)
    assert store.url == f"s3://{BUCKET}/checkpoints/finetune/{'f' * 16}" and not store.is_local

    def write(folder: Path) -> None:
        (folder / "model.safetensors").write_bytes(b"\x00\x01weights" * 100)
        (folder / "state.json").write_text(json.dumps({"step": 40}))

    store.save(40, write, {"run_id": "abc"})
    fresh = store_for(cfg, "finetune", "f" * 64)  # another process (machine) reading the same bucket
    ckpt = fresh.latest()
    assert ckpt.step == 40 and ckpt.meta == {"run_id": "abc"}
    assert (ckpt.path / "model.safetensors").read_bytes() == b"\x00\x01weights" * 100
    import s3fs

    keys = s3fs.S3FileSystem().find(f"{BUCKET}/checkpoints")
    assert f"{BUCKET}/checkpoints/finetune/{'f' * 16}/step-00000040/MANIFEST.json" in keys


def test_mlflow_run_artifact_lands_in_s3(spot_services, tmp_path):
    from pipeline.registry.client import experiment_id, mlflow_client

    cfg, _ = spot_services
    client = mlflow_client(cfg, create=True)
    run = client.create_run(experiment_id(client, cfg, create=True))
    note = tmp_path / "note.txt"
    note.write_text("played in the style")
    client.log_artifact(run.info.run_id, str(note), "eval")
    client.log_metric(run.info.run_id, "train_loss", 1.5, step=1)
    client.set_terminated(run.info.run_id)
    import s3fs

    keys = s3fs.S3FileSystem().find(f"{BUCKET}/mlflow")
    assert any(k.endswith(f"{run.info.run_id}/artifacts/eval/note.txt") for k in keys), keys
    assert client.get_metric_history(run.info.run_id, "train_loss")[0].value == 1.5


def test_status_and_reachability(spot_services):
    cfg, _ = spot_services
    rows = status(cfg.services.state_dir)
    assert {r["name"] for r in rows} == {"s3", "mlflow", "prefect"} and all(r["healthy"] for r in rows)
    assert unreachable(cfg) == []
    no_bucket = cfg.model_copy(
        update={"checkpoint": cfg.checkpoint.model_copy(update={"dir": "s3://no-such-bucket/c"})}
    )
    assert [p for p in unreachable(no_bucket) if p.startswith("S3 bucket of s3://no-such-bucket/c")]
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:  # Prefect's own client, on PREFECT_API_URL from the profile
        assert client.api_url.port == int(cfg.services.prefect_api_url.split(":")[-1].split("/")[0])
        client.hello()
    with pytest.raises(ServicesError, match="already running"):
        up(cfg)


def test_down_stops_exactly_its_processes(tmp_path, monkeypatch):
    """A set of its own: down leaves none of its processes (nor their children) behind, and nothing else."""
    cfg = spot_cfg(tmp_path, free_ports(3))
    for key, value in AWS_ENV.items():
        monkeypatch.setenv(key, value)
    bystander = psutil.Popen(["sleep", "60"])  # not ours to stop
    try:
        state = up(cfg)
        family = set()
        for entry in state["services"].values():
            leader = psutil.Process(entry["pid"])
            family |= {p.pid for p in [leader, *leader.children(recursive=True)]}
        assert sorted(down(cfg.services.state_dir)) == ["mlflow", "prefect", "s3"]
        left = [pid for pid in family if psutil.pid_exists(pid) and psutil.Process(pid).status() != "zombie"]
        assert not left
        assert bystander.is_running() and status(cfg.services.state_dir) == []
        assert down(cfg.services.state_dir) == []
        assert "services.s3_endpoint_url" in "\n".join(unreachable(cfg))
    finally:
        bystander.kill()
        down(cfg.services.state_dir)


def test_unreachable_services_are_named_before_any_work(tmp_path):
    cfg = spot_cfg(tmp_path, free_ports(3))  # nothing listens on these ports
    with pytest.raises(ServicesError) as err:
        check_reachable(cfg)
    for key in ("services.prefect_api_url", "project.mlflow_uri", "services.s3_endpoint_url"):
        assert key in str(err.value)


def test_profile_must_be_on_loopback_and_complete(tmp_path):
    cfg = spot_cfg(tmp_path, free_ports(3))
    with pytest.raises(ServicesError, match=r"127\.0\.0\.1"):
        plan(cfg.model_copy(update={"project": cfg.project.model_copy(update={"mlflow_uri": "http://10.0.0.1:5000"})}),
             tmp_path)  # fmt: skip
    with pytest.raises(ServicesError, match=r"services\.s3_endpoint_url"):
        plan(Config(), tmp_path)
