"""`jam runs` table, run listing, bundle download and the `jam ui` command line."""

from __future__ import annotations

import pytest
import yaml
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.core.config import config_from_dict
from pipeline.core.graph import run_stage
from pipeline.registry.client import RunsError, mlflow_client
from pipeline.registry.runs import download_bundle, list_runs, runs_table, ui_command
from tests.pipeline.registry.test_promote import GOOD, _style_bundle, fake_run, make_store


def test_jam_runs_lists_both_runs_with_aliases(tmp_path):
    cfg = make_store(tmp_path / "store", "jam-runs")
    cfg = cfg.model_copy(update={"styles": config_from_dict({"styles": {"solo": {"sources": ["x"]}}}).styles})
    # Training logs the whole config flattened: both sections appear in every run.
    flat = {
        "pretrain.max_steps": "300",
        "pretrain.lr": "0.001",
        "finetune.lora_r": "8",
        "finetune.max_steps": "120",
        "finetune.lr": "0.0002",
    }
    base = fake_run(cfg, "base", {"test_nll": 2.5}, params=flat)
    ci = {"style_score_ci_low": 0.55, "style_score_ci_high": 0.66}
    metrics = {"test_nll": 2.0, "style_score": 0.61, **ci, **GOOD}
    ft = fake_run(cfg, "finetune", metrics, base, _style_bundle("solo"), params=flat, tags={"jam.style": "solo"})
    promoted = run_stage("promote", cfg)
    assert promoted.action == "promoted"
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"project": cfg.project.model_dump(mode="json")}))

    result = CliRunner().invoke(app, ["runs", "--params", str(params)])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].split()[:7] == ["run", "role", "style", "started", "lora_r", "steps", "lr"]
    ft_line = next(line for line in lines if line.startswith(ft[:8]))
    base_line = next(line for line in lines if line.startswith(base[:8]))
    release_line = next(line for line in lines if line.startswith(promoted.run_id[:8]))
    assert "finetune  solo" in ft_line and " 8 " in ft_line and "0.0002" in ft_line
    assert "release" in release_line and release_line.endswith("champion") and "champion" not in ft_line
    assert "0.61 [0.55, 0.66]" in ft_line and "0.9" in ft_line  # style_score with its CI; validity
    assert "base" in base_line and "300" in base_line and "0.001" in base_line and "champion" not in base_line
    assert " 8 " not in base_line  # a base run has no LoRA rank


def test_list_runs_filters_role_and_unfinished(tmp_path):
    cfg = make_store(tmp_path / "store", "jam-list")
    base = fake_run(cfg, "base")
    ft = fake_run(cfg, "finetune", base_run_id=base)
    client = mlflow_client(cfg)
    exp = client.get_experiment_by_name(cfg.project.name).experiment_id
    client.create_run(exp, tags={"jam.role": "finetune"})  # still running: not a candidate
    assert [r.run_id for r in list_runs(cfg, role="finetune")] == [ft]
    assert {r.run_id for r in list_runs(cfg)} == {base, ft}
    assert len(list_runs(cfg, finished_only=False)) == 3
    assert len(runs_table(cfg).splitlines()) == 4  # header + every run, unfinished included


def test_download_bundle_caches_and_reports_missing(tmp_path):
    cfg = make_store(tmp_path / "store", "jam-dl")
    ok = fake_run(cfg, "finetune")
    none = fake_run(cfg, "finetune", bundle=False)
    got = download_bundle(cfg, ok, tmp_path / "cache")
    assert (got / "bundle.json").exists() and got == tmp_path / "cache" / ok / "bundle"
    assert download_bundle(cfg, ok, tmp_path / "cache") == got  # cached
    with pytest.raises(RunsError, match="no 'bundle' artifact"):
        download_bundle(cfg, none, tmp_path / "cache")
    assert not (tmp_path / "cache" / none).exists()


def test_runs_without_store_is_a_clear_error(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"project": {"mlflow_uri": f"sqlite:///{tmp_path}/none/mlflow.db"}}))
    result = CliRunner().invoke(app, ["runs", "--params", str(params)])
    assert result.exit_code == 1
    assert "no MLflow store" in result.output


def test_ui_command_is_loopback_only():
    from pipeline.core.config import Config

    cmd, url = ui_command(Config(), port=5123)
    assert cmd[cmd.index("--host") + 1] == "127.0.0.1"
    assert cmd[cmd.index("--port") + 1] == "5123"
    assert cmd[cmd.index("--backend-store-uri") + 1] == "sqlite:///mlruns/mlflow.db"
    assert url == "http://127.0.0.1:5123"


def test_serve_returns_the_server_exit_code():
    import sys

    from pipeline.registry.runs import serve

    assert serve([sys.executable, "-c", "raise SystemExit(3)"]) == 3
