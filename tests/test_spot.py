"""Issue 12's headline: one flow run of the deployment survives the machine that was running it.

Machines A and B are two fresh clones of this repository in separate folders, each with its own `data/` and its own
worker (`prefect worker start --pool`, its own process group, running its own checkout's code); they share nothing
but the session's services: moto S3 (DVC remote, checkpoints, MLflow artifacts), the MLflow tracking server and the
Prefect server. One flow run of the deployment (the whole pipeline, tiny data) goes to A's worker; once A's fine-tune
has put a checkpoint on S3, every process of A is SIGKILLed and A's folder deleted. No one steps in: the Prefect
server notices the missed heartbeats, marks the run Crashed and runs the deployment again; B's worker picks it up,
pulls every data stage from the DVC remote (its transcription does no work), resumes the fine-tune from the S3
checkpoint in the same MLflow run, and ends with the uninterrupted run's adapter and a champion on the tracking server.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import psutil
import pytest
import torch
import yaml
from safetensors.torch import load_file

from flows.deploy import HOME_ENV, deploy
from pipeline.core.config import Config, config_from_dict
from pipeline.core.files import read_json
from tests.flows.test_main import TINY_MODEL
from tests.pipeline.train.test_resume import _history

REPO = Path(__file__).resolve().parents[1]
STEPS = 40  # fine-tune steps, a checkpoint every 4: A is killed after the first one that reaches S3
ADAPTER = Path("data/finetune/bundle/adapters/solo/adapter_model.safetensors")
PAGE = 200  # log lines per request (the API's most)
PULLED = ("demo", "base", "acquire", "transcribe", "clean", "split", "augment", "tokenize", "pretrain")


def _tree(services: Config, prefix: str) -> dict:
    """The whole pipeline on tiny data (4 demo pieces, Basic Pitch, the tiny model), on the spot profile: relative
    data dir (what dvc.yaml tracks), and an experiment, pool, DVC remote and checkpoint prefix of this test's own."""
    tree = services.model_dump(mode="json")
    tree["project"].update(name=f"spot-{prefix}", data_dir="data", workers=1, artifact_dir="mlruns/artifacts")
    tree["checkpoint"].update(dir=f"{services.checkpoint.dir}/{prefix}", every_steps=4, every_s=3600)
    tree["services"].update(dvc_remote=f"{services.services.dvc_remote}/{prefix}", work_pool=f"spot-{prefix}",
                            deployment="headline", state_dir=".services")  # fmt: skip
    over = {
        "demo": {
            "players": {"solo": {"composers": ["chopin", "joplin", "mozart", "haydn"], "max_pieces": 4}},
            "excerpt_s": 6.0,
        },
        "styles": {"solo": {"sources": ["data/demo/audio/solo"]}},
        "acquire": {"retries": 0, "backoff_s": 0},
        "clean": {"min_notes": 4, "min_duration_s": 1.0},
        "base": {"max_pieces": 6, "composers": ["bach"]},
        "tokenize": {"vocab_size": 300, "max_seq_len": 64, "overlap": 16},
        "transcribe": {"backend": "basic_pitch"},
        **TINY_MODEL,
    }
    over["finetune"] = {**over["finetune"], "max_steps": STEPS, "eval_every": 8}
    over.pop("checkpoint")
    for section, values in over.items():
        tree[section] = values if section == "styles" else {**tree.get(section, {}), **values}
    return tree


def _machine(dest: Path, tree: dict) -> Path:
    subprocess.run(["git", "clone", "--quiet", str(REPO), str(dest)], cwd=dest.parent, check=True, timeout=120)
    (dest / "params.yaml").write_text(yaml.safe_dump(tree))  # every key: dvc reads some
    return dest


def _worker(machine: Path, pool: str, log: Path) -> subprocess.Popen:
    """`prefect worker start --pool` in the machine's checkout, in a process group of its own."""
    env = {**os.environ, HOME_ENV: str(machine), "PYTHONPATH": str(machine), "TQDM_DISABLE": "1",
           "PREFECT_LOGGING_LEVEL": "INFO"}  # fmt: skip  # the training's lines are INFO, whatever the suite's level
    cmd = [str(Path(sys.executable).parent / "prefect"), "worker", "start", "--pool", pool]
    with log.open("w") as out:
        return subprocess.Popen(cmd, cwd=machine, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)  # fmt: skip


def _reclaim(worker: subprocess.Popen) -> None:
    """The VM is reclaimed: every process of the machine stops at once (frozen first, so none reports the others'
    deaths), then dies. The flow run has a session of its own, so the worker's group alone would not be all of A."""
    family = [psutil.Process(worker.pid), *psutil.Process(worker.pid).children(recursive=True)]
    for sig in (signal.SIGSTOP, signal.SIGKILL):
        for proc in family:
            proc.send_signal(sig)
    worker.wait(timeout=60)
    psutil.wait_procs(family, timeout=30)


def _wait(what: str, check, timeout: float, every: float = 1.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := check():
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def _checkpoints(cfg: Config) -> dict[int, dict]:
    """Step -> manifest of each complete fine-tune checkpoint on S3 (the manifest is written last)."""
    import s3fs

    fs = s3fs.S3FileSystem()
    fs.invalidate_cache()
    root = f"{cfg.checkpoint.dir.removeprefix('s3://')}/finetune"
    keys = fs.find(root) if fs.exists(root) else []
    return {int(m.group(1)): json.loads(fs.cat_file(k)) for k in keys
            if (m := re.search(r"step-(\d+)/MANIFEST\.json$", k))}  # fmt: skip


def _runs(client, deployment_id: str):
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
    from prefect.client.schemas.sorting import FlowRunSort

    ours = DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id]))
    return client.read_flow_runs(deployment_filter=ours, sort=FlowRunSort.EXPECTED_START_TIME_ASC, limit=20)


def _resumed_at(client, run_id) -> tuple[int, datetime]:
    """(step, time) of the "resumed from step N" line the training child logged into the flow run."""
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    ours = LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run_id]))  # (text search needs Postgres)

    def find():
        for offset in itertools.count(0, PAGE):
            logs = client.read_logs(log_filter=ours, limit=PAGE, offset=offset)
            for log in logs:
                if m := re.search(r"resumed from step (\d+)", log.message):
                    return int(m.group(1)), log.timestamp
            if len(logs) < PAGE:
                return None

    return _wait("the resumed run's 'resumed from step' log line", find, timeout=60)


def _pushed(client, run_id) -> list[str]:
    """The stages the flow run pushed to the DVC remote (its `push-<stage>` task runs)."""
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.client.schemas.sorting import TaskRunSort

    ours = FlowRunFilter(id=FlowRunFilterId(any_=[run_id]))
    runs = client.read_task_runs(flow_run_filter=ours, sort=TaskRunSort.EXPECTED_START_TIME_ASC, limit=PAGE, offset=0)
    return sorted(
        r.name.removeprefix("push-").rsplit("-", 1)[0] for r in runs if r.name.startswith("push-")
    )  # push-<stage>-<id>


def _timeline(client, first, again, killed: float, resumed: datetime) -> str:
    """Seconds after the kill at which each step of the recovery happened (Prefect's timestamps, this machine)."""
    crashed = client.read_flow_run(first).state.timestamp  # the last state: Crashed
    started = client.read_flow_run(again).start_time  # B's worker started the re-run
    marks = {"marked crashed": crashed, "re-run started on B": started, "training resumed": resumed}
    return ", ".join(f"{what} +{t.timestamp() - killed:.1f} s" for what, t in marks.items())


def _reference(tmp: Path, machine_b: Path, tree: dict) -> Path:
    """The uninterrupted fine-tune on the same data and base (B's pulled copies): local checkpoints, sqlite store."""
    ref = tmp / "straight"
    for stage in ("tokenize", "pretrain"):
        shutil.copytree(machine_b / "data" / stage, ref / "data" / stage)
    local = json.loads(json.dumps(tree))
    local["project"].update(data_dir=str(ref / "data"), mlflow_uri=f"sqlite:///{ref}/mlruns/mlflow.db",
                            artifact_dir=str(ref / "mlruns" / "artifacts"))  # fmt: skip
    local["checkpoint"]["dir"] = None
    local["services"] = {}
    (ref / "params.yaml").write_text(yaml.safe_dump(local))
    env = {**os.environ, "PYTHONPATH": str(REPO), "TQDM_DISABLE": "1"}
    cmd = [sys.executable, "-m", "pipeline.train", "--stage", "finetune", "-p", "params.yaml"]
    proc = subprocess.run(cmd, cwd=ref, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return ref


def _check_tracking(cfg: Config, run_id: str, ref: Path) -> None:
    """One finished fine-tune run on the server (the one A's checkpoint named), every step once, equal to the
    reference's; a champion registered from it."""
    from pipeline.registry.client import mlflow_client
    from pipeline.registry.runs import list_runs

    client = mlflow_client(cfg)
    (finetune,) = list_runs(cfg, role="finetune", client=client)  # one run across both machines
    assert finetune.run_id == run_id and client.get_run(run_id).info.status == "FINISHED"
    _, want = _history(ref)
    for key, points in want.items():
        got = sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))
        assert [s for s, _ in got] == [s for s, _ in points], f"{key}: {[s for s, _ in got]}"  # each step once
        assert torch.allclose(torch.tensor(got), torch.tensor(points), atol=1e-6, rtol=0)
    assert [s for s, _ in want["train_loss"]] == list(range(1, STEPS + 1))
    champion = client.get_model_version_by_alias(cfg.project.name, "champion")
    assert json.loads(champion.tags["jam.sources"]) == {"solo": run_id}


def _no_rework(machine: Path) -> None:
    """B pulled every data stage and redid nothing: no transcription, no pretraining."""
    for stage in PULLED:
        report = read_json(machine / "data" / stage / "report.json")
        assert report and report["processed"] == [], (stage, report)
    assert len(read_json(machine / "data" / "transcribe" / "report.json")["cached"]) == 4


@pytest.mark.slow
@pytest.mark.spot
def test_one_flow_run_survives_the_loss_of_its_machine(spot_services, tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment

    tree = _tree(spot_services[0], tmp_path.name)
    cfg = config_from_dict(tree)
    machine_a, machine_b = _machine(tmp_path / "a", tree), _machine(tmp_path / "b", tree)
    made = deploy(cfg, "params.yaml")  # each worker reads params.yaml in its own checkout
    worker_a = _worker(machine_a, cfg.services.work_pool, tmp_path / "worker-a.log")
    worker_b = None
    try:
        with get_client(sync_client=True) as client:
            first = run_deployment(made["deployment"], timeout=0)
            _wait("A to run the flow", lambda: client.read_flow_run(first.id).state_name == "Running", 240)
            worker_b = _worker(machine_b, cfg.services.work_pool, tmp_path / "worker-b.log")  # a machine on standby
            # step 0 is written before the first step: wait for one that holds training
            _wait("A's fine-tune checkpoint at step 4", lambda: max(_checkpoints(cfg), default=0) >= 4, 900, every=0.2)
            _reclaim(worker_a)
            killed, on_s3 = time.time(), _checkpoints(cfg)
            last, run_id = max(on_s3), on_s3[max(on_s3)]["meta"]["run_id"]  # the MLflow run travels in it
            shutil.rmtree(machine_a)  # and its disk with it
            assert last < STEPS, "the fine-tune ended before A was killed"
            again = _wait("the re-run", lambda: [r for r in _runs(client, made["deployment_id"]) if r.id != first.id],
                          timeout=300)[0]  # fmt: skip
            _wait("the re-run to end", lambda: client.read_flow_run(again.id).state.is_final(), timeout=900, every=2)
            assert client.read_flow_run(again.id).state_name == "Completed", (tmp_path / "worker-b.log").read_text()
            assert client.read_flow_run(first.id).state_name == "Crashed"
            assert len(_runs(client, made["deployment_id"])) == 2  # one re-run, no duplicate
            step, at = _resumed_at(client, again.id)
            assert _pushed(client, again.id) == ["finetune"]  # the pulled stages did no work: nothing to push back
            timeline = _timeline(client, first.id, again.id, killed, at)
    finally:
        for worker in (worker_a, worker_b):
            if worker and worker.poll() is None:
                _reclaim(worker)
    print(f"kill on A -> training resumed on B: {at.timestamp() - killed:.1f} s ({timeline})")
    assert step == last
    _no_rework(machine_b)
    ref = _reference(tmp_path, machine_b, tree)
    want, got = load_file(ref / ADAPTER), load_file(machine_b / ADAPTER)
    assert want.keys() == got.keys() and want
    assert max(float((want[k] - got[k]).abs().max()) for k in want) <= 1e-6
    assert read_json(machine_b / "data/finetune/solo/report.json")["stats"]["run_id"] == run_id
    _check_tracking(cfg, run_id, ref)
