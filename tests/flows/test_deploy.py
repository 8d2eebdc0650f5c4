"""`jam deploy` on the real Prefect server: a worker runs the deployment; after its flow-run process is killed, the
automation runs it again, the worker picks it up and the pipeline completes without anyone stepping in."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import yaml

from flows.deploy import HOME_ENV, deploy
from pipeline.core.config import load_config
from pipeline.core.files import read_json

REPO = Path(__file__).resolve().parents[2]
POOL = "jam-test"


def _wait(what: str, check, timeout: float = 240.0, every: float = 0.5):  # a worker starts slowly on 2 busy cores
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out waiting for {what}")


def _runs(client, deployment_id: str):
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
    from prefect.client.schemas.sorting import FlowRunSort

    ours = DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id]))
    return client.read_flow_runs(deployment_filter=ours, sort=FlowRunSort.EXPECTED_START_TIME_ASC, limit=20)


def _engine(worker: subprocess.Popen) -> psutil.Process | None:
    for child in psutil.Process(worker.pid).children(recursive=True):
        if "prefect.engine" in " ".join(child.cmdline()):
            return child
    return None


def _kill_tree(proc: psutil.Process) -> None:
    """SIGKILL a flow-run process and everything it started, as a reclaimed machine would."""
    family = [proc, *proc.children(recursive=True)]
    for p in family:
        p.send_signal(signal.SIGKILL)
    psutil.wait_procs(family, timeout=10)


def test_crashed_run_is_rerun_on_the_pool_and_completes(spot_services, tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment

    cfg, _ = spot_services
    tree = cfg.model_dump(mode="json")
    tree["project"].update(data_dir=str(tmp_path / "data"), workers=1)
    tree["demo"].update(players={"solo": {"composers": ["chopin", "joplin", "haydn"], "max_pieces": 3}}, excerpt_s=8.0)
    tree["services"].update(dvc_remote=None, work_pool=POOL, deployment="test")
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(tree))
    cfg = load_config(params)
    result = deploy(cfg, str(params), until="demo")
    assert result["deployment"] == "jam-pipeline/test" and len(result["automations"]) == 2

    env = {**os.environ, HOME_ENV: str(REPO), "PYTHONPATH": str(REPO)}
    prefect = str(Path(sys.executable).parent / "prefect")
    worker = subprocess.Popen([prefect, "worker", "start", "--pool", POOL], env=env, start_new_session=True,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        with get_client(sync_client=True) as client:
            first = run_deployment(result["deployment"], timeout=0)
            _wait("the first run to start", lambda: client.read_flow_run(first.id).state_name == "Running")
            _kill_tree(_wait("its flow-run process", lambda: _engine(worker), timeout=30))
            killed = time.monotonic()
            _wait("the worker to report it Crashed", lambda: client.read_flow_run(first.id).state_name == "Crashed")
            runs = _wait("the automation's new run", lambda: [r for r in _runs(client, result["deployment_id"])
                                                              if r.id != first.id])  # fmt: skip
            again = runs[0].id
            _wait("the new run to complete", lambda: client.read_flow_run(again).state.is_final(), timeout=180)
            assert client.read_flow_run(again).state_name == "Completed"
            print(f"kill -> re-run completed: {time.monotonic() - killed:.1f} s")
    finally:
        os.killpg(worker.pid, signal.SIGKILL)
        worker.wait(timeout=30)
    report = read_json(tmp_path / "data" / "demo" / "report.json")
    assert report["items_in"] == 3 and not report["failed"]
