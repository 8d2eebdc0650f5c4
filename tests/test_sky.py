"""sky/finetune.yaml: a managed spot job whose commands are real `jam` commands with params that validate.

SkyPilot's own parser is not used: skypilot 0.14 would downgrade click and uvicorn under Prefect. This checks the
fields a relaunch depends on and runs the job's `run:` script with `jam` recorded instead of executed.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import typer.main
import yaml

from pipeline.cli import app
from pipeline.core.config import load_config

REPO = Path(__file__).resolve().parents[1]


def _jam_calls(task: dict, calls: Path) -> list[list[str]]:
    """The argument lists the run script passes to jam, via bash itself (quoting and $VARS as on the VM)."""
    script = task["run"].replace(".venv/bin/jam", "jam_record")
    record = 'jam_record() { printf "%s\\0" jam "$@" >>"$CALLS"; printf "\\n" >>"$CALLS"; }\n'
    env = {**os.environ, **{k: str(v) for k, v in task["envs"].items()}, "CALLS": str(calls)}
    subprocess.run(["bash", "-c", record + script], env=env, check=True, timeout=30)
    lines = calls.read_text().split("\n")
    return [[a for a in line.split("\0") if a] for line in lines if line.strip("\0")]


def test_finetune_job_is_a_spot_job_running_real_jam_commands(tmp_path):
    task = yaml.safe_load((REPO / "sky" / "finetune.yaml").read_text())
    assert task["resources"]["use_spot"] is True
    assert task["resources"]["job_recovery"]["strategy"] == "FAILOVER"
    assert set(task["secrets"]) == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}  # names only, no values
    assert all(v is None for v in task["secrets"].values())
    calls = _jam_calls(task, tmp_path / "calls")
    assert [c[1] for c in calls] == ["pull", "train"]
    group = typer.main.get_command(app)
    for call in calls:
        command = group.get_command(None, call[1])
        ctx = command.make_context(call[1], call[2:])  # click rejects an unknown option or a bad value here
        overrides = ctx.params["set_"]
        cfg = load_config(REPO / ctx.params["params"], overrides)
        assert cfg.checkpoint.dir == task["envs"]["JAM_CHECKPOINT_DIR"]
        assert cfg.project.mlflow_uri == task["envs"]["JAM_MLFLOW_URI"] and cfg.services.s3_endpoint_url is None
    assert calls[1][calls[1].index("--stage") + 1] == "finetune"
