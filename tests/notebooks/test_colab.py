"""notebooks/colab.ipynb, executed headless (nbclient) on CPU with tiny params: a kernel killed mid-training (what
a Colab disconnect does) and the same notebook run again resumes from the checkpoint on the "drive" and finishes."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.pipeline.train.test_model import write_project

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

REPO = Path(__file__).resolve().parents[2]
NOTEBOOK = REPO / "notebooks" / "colab.ipynb"
STEPS = 40  # optimizer steps; checkpoints every 4: the kill comes after the first one, well before the end
OVER = {"finetune": {"max_steps": STEPS, "eval_every": 8}, "checkpoint": {"every_steps": 4}}
ADAPTER = Path("data/finetune/bundle/adapters/style/adapter_model.safetensors")


def _project(root: Path) -> Path:
    """A DVC project folder with token data, a base bundle and params (what the data stages would leave)."""
    write_project(root, **OVER)
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    subprocess.run([sys.executable, "-m", "dvc", "init", "--no-scm", "-q"], cwd=root, check=True, env=env)
    return root


def _notebook(project: Path, drive: Path):
    """The notebook with a parameters cell after its own (papermill's convention): no install, our folders."""
    nb = nbformat.read(NOTEBOOK, as_version=4)
    at = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
    given = f"DRIVE = {str(drive)!r}\nPROJECT = {str(project)!r}\nINSTALL = False\nRUN = 'finetune'\n"
    nb.cells.insert(at + 1, nbformat.v4.new_code_cell(given))
    return nb


def _client(nb, project: Path):
    return nbclient.NotebookClient(
        nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(project)}}
    )


def _text(nb) -> str:
    return "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))


def _checkpoints(drive: Path) -> list[int]:
    found = (drive / "checkpoints" / "finetune").glob("*/step-*/MANIFEST.json")
    return sorted(int(p.parent.name.split("-")[1]) for p in found)


def _kill_after_a_checkpoint(client, drive: Path, timeout_s: float = 600) -> None:
    """Execute in a thread; once a checkpoint past step 0 is on the drive, SIGKILL the kernel's process group."""
    failure: list[BaseException] = []

    def execute() -> None:
        try:
            client.execute()
        except BaseException as err:  # the dead kernel's error, checked below
            failure.append(err)

    thread = threading.Thread(target=execute, daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout_s
    while not [s for s in _checkpoints(drive) if s > 0]:
        assert thread.is_alive() and time.monotonic() < deadline, f"no checkpoint appeared: {failure}"
        time.sleep(0.05)
    pid = client.km.provisioner.pid  # the kernel leads its own session: its group holds the training child too
    os.killpg(os.getpgid(pid), signal.SIGKILL)
    thread.join(120)
    assert failure and isinstance(failure[0], nbclient.exceptions.DeadKernelError), failure


@pytest.mark.slow
def test_colab_notebook_resumes_after_the_kernel_dies(tmp_path, monkeypatch):
    project, drive = _project(tmp_path / "content"), tmp_path / "drive" / "MyDrive" / "jam"
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")

    _kill_after_a_checkpoint(_client(_notebook(project, drive), project), drive)
    killed_at = _checkpoints(drive)
    assert killed_at and max(killed_at) < STEPS and not (project / ADAPTER).exists()  # stopped mid-training

    second = _notebook(project, drive)
    _client(second, project).execute()
    log = _text(second)
    resumed = int(re.search(r"resumed from step (\d+)", log).group(1))
    assert resumed >= max(killed_at) > 0, log[-3000:]  # continued from the drive, not restarted
    assert f"step {STEPS}/{STEPS}" in log and (project / ADAPTER).exists()
    assert f"{drive}/dvc-cache" in (project / ".dvc" / "config.local").read_text()  # DVC's cache on the drive

    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{drive}/mlruns/mlflow.db")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"  # one MLflow run across both sessions
    steps = [m.step for m in client.get_metric_history(runs[0].info.run_id, "train_loss")]
    assert steps == list(range(1, STEPS + 1))  # each step logged once, none lost to the kill
