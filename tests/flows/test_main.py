"""The real Prefect flow on tiny data: demo renders -> transcription -> ... -> token windows."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from prefect.testing.utilities import prefect_test_harness

from flows.main import jam_flow
from pipeline.core import graph
from pipeline.core.config import config_from_dict
from pipeline.core.files import piece_id, read_json
from pipeline.core.items import AllItemsFailed

REAL_POPEN = subprocess.Popen  # the fake training child below is a real process


@pytest.fixture(scope="module", autouse=True)
def prefect_server():
    with prefect_test_harness(server_startup_timeout=120):
        yield


def tiny_cfg(data: Path, sources: list[str] | None = None, **extra):
    tree = {
        "project": {"data_dir": str(data), "workers": 1, "mlflow_uri": f"sqlite:///{data}/mlflow.db"},
        "demo": {
            "players": {"solo": {"composers": ["chopin", "joplin", "mozart", "haydn"], "max_pieces": 4}},
            "excerpt_s": 6.0,
        },
        "styles": {"solo": {"sources": sources or [str(data / "demo" / "audio" / "solo")]}},
        "acquire": {"retries": 0, "backoff_s": 0},
        "clean": {"min_notes": 4, "min_duration_s": 1.0},
        "base": {"max_pieces": 6, "composers": ["bach"]},
        "tokenize": {"vocab_size": 300, "max_seq_len": 64, "overlap": 16},
        "transcribe": {"backend": "basic_pitch"},  # the flow's wiring is under test; Transkun: test_transcribers.py
        **extra,
    }
    return config_from_dict(tree)


def run(cfg):
    return jam_flow(cfg=cfg, dvc_commit=False, until="tokenize")


@pytest.mark.slow
def test_data_flow_end_to_end_and_incremental(tmp_path):
    data = tmp_path / "data"
    cfg = tiny_cfg(data)
    summary = run(cfg)
    assert "4 sources" in summary
    ran = [row.split("|")[1].strip() for row in summary.splitlines() if row.startswith("| ") and "| in |" not in row]
    assert ran == [s.name for s in graph.until("tokenize")]  # the flow runs the graph's nodes, in its order

    transcribe = read_json(data / "transcribe" / "report.json")
    assert len(transcribe["processed"]) == 4 and not transcribe["failed"]

    split = read_json(data / "split" / "split.json")
    style = split["styles"]["solo"]
    pieces = {name: {piece_id(i) for i in ids} for name, ids in style.items()}
    assert pieces["train"] and pieces["valid"] and pieces["test"]
    assert not (pieces["train"] & pieces["test"]) and not (pieces["train"] & pieces["valid"])

    augmented = {piece_id(p.stem) for p in (data / "augment" / "midi").glob("*.mid")}
    assert augmented == pieces["train"]  # only train pieces are augmented
    aug = read_json(data / "augment" / "report.json")
    assert aug["outputs"] >= 10 * len(style["train"])

    windows = np.load(data / "tokenize" / "style" / "solo" / "train.npy")
    assert windows.ndim == 2 and windows.shape[1] == 64 and len(windows) > 0

    # nothing changed: no stage does any work
    run(cfg)
    for stage in ("demo", "base", "acquire", "transcribe", "clean", "augment", "tokenize"):
        report = read_json(data / stage / "report.json")
        assert report["processed"] == [], stage

    # one more source: only that one is acquired and transcribed
    extra = tmp_path / "extra"
    extra.mkdir()
    first = sorted((data / "demo" / "audio" / "solo").glob("*.wav"))[0]
    (extra / "another-take.wav").write_bytes(first.read_bytes())
    cfg2 = tiny_cfg(data, sources=[str(data / "demo" / "audio" / "solo"), str(extra)])
    run(cfg2)
    assert len(read_json(data / "acquire" / "report.json")["processed"]) == 1
    assert len(read_json(data / "transcribe" / "report.json")["processed"]) == 1


@pytest.mark.slow
def test_bad_items_are_recorded_and_the_rest_go_on(tmp_path):
    data = tmp_path / "data"
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "not-audio.wav").write_text("this is not audio")
    (bad / "empty.mp3").write_bytes(b"")
    cfg = tiny_cfg(data, sources=[str(data / "demo" / "audio" / "solo"), str(bad)])
    run(cfg)
    acquire = read_json(data / "acquire" / "report.json")
    assert len(acquire["failed"]) == 2
    assert all(msg for msg in acquire["failed"].values())
    assert len(acquire["processed"]) == 4
    assert not list(data.rglob("*.tmp*"))  # no partial files


@pytest.mark.slow
def test_every_item_failing_stops_with_one_message(tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "broken.wav").write_bytes(b"RIFF\x00\x00")
    cfg = tiny_cfg(tmp_path / "data", sources=[str(bad)], demo={"enabled": False})
    with pytest.raises(AllItemsFailed, match="acquire: all 1 items failed"):
        run(cfg)
    assert json.loads((tmp_path / "data" / "acquire" / "report.json").read_text())["failed"]


TINY_MODEL = {
    "model": {"hidden_size": 64, "num_layers": 2, "num_heads": 2, "intermediate_size": 128},
    "pretrain": {"batch_size": 8, "max_steps": 30, "warmup_steps": 3, "eval_every": 15, "system_metrics": False},
    "finetune": {"batch_size": 8, "max_steps": 20, "warmup_steps": 2, "eval_every": 10, "system_metrics": False},
    "checkpoint": {"every_steps": 10},
    "evaluate": {"n_prompts": 2, "seeds": [0], "prompt_tokens": 8, "n_tokens": 32, "plots": 1},
    # the tiny model is judged on whether the machinery works, not on its music
    "promote": {"min_gain": 0.0, "min_validity": 0.0},
}


@pytest.mark.slow
def test_train_evaluate_promote_and_a_poor_run_does_not_displace(tmp_path):
    from pipeline.registry.client import mlflow_client
    from pipeline.registry.runs import list_runs

    data = tmp_path / "data"
    cfg = tiny_cfg(data, **TINY_MODEL)
    summary = jam_flow(cfg=cfg, dvc_commit=False, until="promote")
    assert "promote: promoted" in summary

    client = mlflow_client(cfg)
    champion = client.get_model_version_by_alias(cfg.project.name, "champion")
    (finetune,) = list_runs(cfg, role="finetune", client=client)
    assert json.loads(champion.tags["jam.sources"]) == {"solo": finetune.run_id}
    assert finetune.metrics["test_nll"] < finetune.metrics["base_test_nll"]  # the fine-tune learned the style

    # a deliberately poor run: one step. It is trained, evaluated, compared, and does not become champion.
    poor = tiny_cfg(data, **{**TINY_MODEL, "finetune": {**TINY_MODEL["finetune"], "max_steps": 1, "warmup_steps": 0}})
    summary = jam_flow(cfg=poor, dvc_commit=False, until="promote")
    assert "promote: unchanged" in summary
    assert len(list_runs(poor, role="finetune", client=client)) == 2
    assert client.get_model_version_by_alias(cfg.project.name, "champion").version == champion.version


def _fake_training(monkeypatch, codes: list[int]):
    """Replace the `jam train` child by a real child that logs a line and exits with the next code; returns the
    commands the flow asked for."""
    import flows.main as M

    calls = []

    def fake_popen(cmd, **kwargs):
        calls.append(cmd)
        code = codes[len(calls) - 1]
        return REAL_POPEN(
            [sys.executable, "-c", f"import sys; print('boom', file=sys.stderr); sys.exit({code})"], **kwargs
        )

    monkeypatch.setattr(M.subprocess, "Popen", fake_popen)
    return calls


def test_training_is_retried_after_preemption_only(tmp_path, monkeypatch):
    from prefect import flow

    from flows.main import EXIT_PREEMPTED, stage_task
    from pipeline.core import graph
    from pipeline.core.items import StageReport

    cfg = tiny_cfg(tmp_path / "data", checkpoint={"preemption_retries": 3})
    StageReport("finetune", items_in=5, processed=["style"]).finish(cfg.stage_dir("finetune"))

    @flow
    def only_training(cfg):
        return stage_task(graph.stage("finetune"), cfg)("finetune", cfg)

    calls = _fake_training(monkeypatch, [EXIT_PREEMPTED, EXIT_PREEMPTED, 0])
    report = only_training(cfg)
    assert len(calls) == 3 and report.processed == ["style"]  # resumed twice, then finished
    assert "--params" in calls[0] and calls[0][calls[0].index("--stage") + 1] == "finetune"

    calls = _fake_training(monkeypatch, [1, 0])
    with pytest.raises(RuntimeError, match="finetune failed \\(exit 1\\): boom"):
        only_training(cfg)
    assert len(calls) == 1  # a real error is not retried
