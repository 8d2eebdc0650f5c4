"""`jam play`, `jam bench latency` and `python -m realtime`; realtime/ stays free of pipeline imports."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import mido
import pytest
import yaml
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.core.config import load_config
from realtime.__main__ import build_parser, parse_args
from realtime.settings import RealtimeSettings
from tests.realtime.conftest import phrase_file, unmatched_notes

runner = CliRunner()
REPO = Path(__file__).resolve().parents[2]


def empty_params(tmp_path):
    """A params file with every section at its defaults, but the project's store and data under `tmp_path` (so a
    champion of the checkout's own demo is not found)."""
    path = tmp_path / "params.yaml"
    path.write_text(f"project: {{data_dir: {tmp_path}/data, mlflow_uri: 'sqlite:///{tmp_path}/mlflow.db'}}\n")
    return path


def test_every_setting_is_a_play_option_and_a_module_flag_with_the_same_name():
    result = runner.invoke(app, ["play", "--help"], env={"COLUMNS": "250", "NO_COLOR": "1"})
    assert result.exit_code == 0
    module_flags = {s for action in build_parser()._actions for s in action.option_strings}
    for name in RealtimeSettings.model_fields:
        flag = "--" + name.replace("_", "-")
        assert flag in result.output, flag
        assert flag in module_flags, flag
    for flag in ["--no-record", "--no-follow-clock", "--no-normalize-weights", "-a", "-i", "--input"]:
        assert flag in result.output, flag
    assert {"--registry-name", "--tracking-uri"} <= module_flags  # jam play takes them from project.*


def test_params_realtime_section_validates_against_the_settings():
    section = yaml.safe_load((REPO / "params.yaml").read_text())["realtime"]
    assert load_config(REPO / "params.yaml").realtime == RealtimeSettings.model_validate(section)


def test_play_file_session_end_to_end(tmp_path, tiny_bundle_master):
    human = phrase_file(tmp_path / "human.mid", phrases=1)
    record = tmp_path / "out" / "session.mid"
    args = ["play", "--model", str(tiny_bundle_master), "--input", str(human), "--silence-gap-s", "0.3",
            "--response-bars", "0.5",
            "--seed", "0", "--record", str(record), "-a", "style=2", "-a", "alt=1", "--top-k", "50",
            "--params", str(empty_params(tmp_path))]  # fmt: skip
    result = runner.invoke(app, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["responses"] == 1 and summary["human_notes"] == 8
    midi = mido.MidiFile(record)
    assert [t.name for t in midi.tracks] == ["human", "model"]
    assert all(unmatched_notes(list(t)) == {} for t in midi.tracks)


def test_play_rejects_bad_values_with_the_dotted_key(tmp_path):
    result = runner.invoke(app, ["play", "--top-p", "2", "--params", str(empty_params(tmp_path))])
    assert result.exit_code == 2
    assert "realtime.top_p" in result.output
    result = runner.invoke(app, ["play", "--mode", "solo", "--params", str(empty_params(tmp_path))])
    assert result.exit_code == 2 and "solo" in result.output
    result = runner.invoke(app, ["play", "-a", "style=loud", "--params", str(empty_params(tmp_path))])
    assert result.exit_code == 2 and "realtime.adapters" in result.output


def test_play_reports_a_missing_champion(tmp_path):
    args = ["play", "--params", str(empty_params(tmp_path)), "--set", f"project.mlflow_uri=sqlite:///{tmp_path}/x.db"]
    result = runner.invoke(app, args)
    assert result.exit_code == 1
    assert "no MLflow store" in result.output


def test_bench_latency_json(tmp_path):
    args = ["bench", "latency", "--json", "--rounds", "2", "--hidden", "32", "--layers", "2", "--heads", "2",
            "--vocab", "420", "--max-seq-len", "64", "--params", str(empty_params(tmp_path))]  # fmt: skip
    result = runner.invoke(app, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["model"]["hidden"] == 32 and out["model"]["layers"] == 2
    assert out["model_ref"] == "random"  # no registry here: no champion to measure
    engine = out["engine"]
    assert engine["chunks"] == 2
    assert engine["p50_ms"] <= engine["p95_ms"] <= engine["p99_ms"]
    assert engine["rtf"] > 0


def test_bench_latency_with_a_performance_as_the_human(tmp_path):
    from tests.realtime.conftest import phrase_file

    human = phrase_file(tmp_path / "human.mid", phrases=2, gap_s=0.3)
    args = ["bench", "latency", "--json", "--mode", "continuous", "--input", str(human), "--hidden", "32",
            "--layers", "2", "--heads", "4", "--kv-heads", "2", "--vocab", "420", "--max-seq-len", "64",
            "--params", str(empty_params(tmp_path))]  # fmt: skip
    result = runner.invoke(app, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["mode"] == "continuous" and out["input"] == str(human) and out["model"]["kv_heads"] == 2
    assert out["backend"].startswith("lean-numba float32 cpu") and out["load_s"] > 0
    assert out["engine"]["chunks"] > 10  # one plan per instant of the performance (16 notes, on and off)
    assert out["p50_ms"] <= out["p95_ms"] <= out["p99_ms"] <= out["max_ms"]
    assert out["ms_per_token"] > 0 and out["rtf"] > 0


def test_runner_path_imports_neither_transformers_nor_peft(tiny_bundle_master):
    code = (
        "import sys\n"
        "from realtime.runner import make_engine, prepare\n"
        "from realtime.engine import ChunkContext\n"
        "from realtime.settings import JamSettings\n"
        f"s = JamSettings(model={str(tiny_bundle_master)!r}, transport='memory', seed=0)\n"
        "engine = make_engine(prepare(s), s)\n"
        "state, res = engine.generate_chunk(engine.start(0.0, 120.0), ChunkContext(until=2.0, max_tokens=8))\n"
        "assert res.tokens > 0\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('transformers', 'peft', 'mlflow'))\n"
        "assert not bad, bad[:5]\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_module_entry_point_parses_flags(tmp_path):
    s = parse_args(["--model", "b", "--input-file", str(tmp_path / "x.mid"), "--silence-gap-s", "0.5",
                    "-a", "a=2", "--adapters", "b=1", "--no-follow-clock", "--top-k", "5"])  # fmt: skip
    assert s.transport == "file" and s.silence_gap_s == 0.5 and s.top_k == 5
    assert s.adapters == {"a": 2.0, "b": 1.0} and s.follow_clock is False
    assert parse_args(["--adapters", "none"]).adapters == {}
    assert parse_args(["-a", "a=2,b=1"]).adapters == {"a": 2.0, "b": 1.0}
    with pytest.raises(ValueError, match=r"realtime\.top_p"):
        parse_args(["--top-p", "2"])


def test_realtime_imports_no_pipeline_code():
    code = (
        "import sys, realtime.runner, realtime.session, realtime.benchmark, realtime.__main__\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('pipeline', 'flows'))\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
