"""`jam play`, `jam bench latency` and `python -m realtime`; realtime/ stays free of pipeline imports."""

from __future__ import annotations

import json
import subprocess
import sys

import mido
from typer.testing import CliRunner

from pipeline.cli import app
from realtime.__main__ import parse_args
from tests.realtime.conftest import phrase_file, unmatched_notes

runner = CliRunner()


def empty_params(tmp_path):
    """A params file with nothing in it: every section at its defaults."""
    path = tmp_path / "params.yaml"
    path.write_text("# defaults\n")
    return path


PLAY_CONTROLS = ["--model", "--mode", "--input-file", "--input-port", "--output-port", "--backend", "--client-name",
                 "--temperature", "--top-p", "--top-k", "--tempo", "--follow-clock", "--bars", "--gap", "--trigger-cc",
                 "--lookahead", "--adapter", "--raw-weights", "--dtype", "--quantization", "--device", "--threads",
                 "--channel", "--record", "--no-record", "--duration", "--seed"]  # fmt: skip


def test_play_help_documents_every_control():
    result = runner.invoke(app, ["play", "--help"], env={"COLUMNS": "200", "NO_COLOR": "1"})
    assert result.exit_code == 0
    for flag in PLAY_CONTROLS:
        assert flag in result.output, flag


def test_play_file_session_end_to_end(tmp_path, tiny_bundle_master):
    human = phrase_file(tmp_path / "human.mid", phrases=1)
    record = tmp_path / "out" / "session.mid"
    args = ["play", "--model", str(tiny_bundle_master), "--input-file", str(human), "--gap", "0.3", "--bars", "0.5",
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
    engine = out["engine"]
    assert engine["chunks"] == 2
    assert engine["p50_ms"] <= engine["p95_ms"] <= engine["p99_ms"]
    assert engine["rtf"] > 0


def test_module_entry_point_parses_flags(tmp_path):
    s = parse_args(["--model", "b", "--input-file", str(tmp_path / "x.mid"), "--silence-gap-s", "0.5",
                    "--adapters", "a=2,b=1", "--follow-clock", "false", "--top-k", "5"])  # fmt: skip
    assert s.transport == "file" and s.silence_gap_s == 0.5 and s.top_k == 5
    assert s.adapters == {"a": 2.0, "b": 1.0} and s.follow_clock is False
    assert parse_args(["--adapters", "none"]).adapters == {}


def test_realtime_imports_no_pipeline_code():
    code = (
        "import sys, realtime.runner, realtime.session, realtime.benchmark, realtime.__main__\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('pipeline', 'flows'))\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
