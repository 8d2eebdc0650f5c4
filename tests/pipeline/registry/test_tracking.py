"""MLflow helpers: flattened params, one run across reopenings, metrics without duplicate steps, bundle artifact."""

from __future__ import annotations

import json

import pytest

from pipeline.registry.tracking import (
    RESUMED_FROM_TAG,
    ROLE_TAG,
    MetricBuffer,
    RunTracker,
    data_version,
    flatten,
    log_bundle,
    loss_plot,
    run_name,
)
from tests.pipeline.train.test_model import tiny_cfg


def test_flatten_dotted_keys():
    flat = flatten({"finetune": {"lora_r": 4, "target_modules": ["q_proj", "v_proj"], "path": None}, "x": {}})
    assert flat == {"finetune.lora_r": "4", "finetune.target_modules": '["q_proj", "v_proj"]',
                    "finetune.path": "None", "x": "{}"}  # fmt: skip


def test_run_names_say_what_the_run_is():
    assert run_name("pretrain", "1a2b3c4d5e6f") == "pretrain-1a2b3c4d"
    assert run_name("finetune", "1a2b3c4d5e6f", "style", "r8") == "finetune-style-r8-1a2b3c4d"


def test_data_version(tmp_path):
    assert data_version(tmp_path / "dvc.lock") == "none"
    (tmp_path / "dvc.lock").write_text("schema: '2.0'\n")
    assert len(data_version(tmp_path / "dvc.lock")) == 64


@pytest.fixture
def tracker(tmp_path):
    cfg = tiny_cfg(tmp_path)
    t = RunTracker(cfg, {ROLE_TAG: "finetune", "git_commit": "abc"}, system_metrics=True)
    yield t
    t.close()


def test_one_run_reopened_by_id(tracker, tmp_path):
    run_id = tracker.open(None)
    run = tracker.client.get_run(run_id)
    assert run.data.tags[ROLE_TAG] == "finetune"
    assert run.data.params["finetune.lora_r"] == "4" and run.data.params["model.hidden_size"] == "32"
    tracker.close("KILLED")

    again = RunTracker(tiny_cfg(tmp_path), {}, system_metrics=False)
    assert again.open(run_id) == run_id
    assert again.client.get_run(run_id).info.status == "RUNNING"
    again.close()
    other = RunTracker(tiny_cfg(tmp_path), {ROLE_TAG: "finetune"}, system_metrics=False)
    new_id = other.open("0123456789abcdef0123456789abcdef")  # not in this store (another machine's)
    assert new_id != run_id
    assert other.client.get_run(new_id).data.tags[RESUMED_FROM_TAG] == "0123456789abcdef0123456789abcdef"
    other.close()
    exp = tracker.client.get_experiment(run.info.experiment_id)
    assert exp.name == "jam-partner" and exp.artifact_location.startswith("file://")


def test_metric_buffer_never_logs_a_step_twice(tracker):
    run_id = tracker.open(None)
    buf = MetricBuffer()
    for step in (1, 2):
        buf.add(step, train_loss=1.0 / step, lr=0.1)
    saved = [list(i) for i in buf.items]  # what a checkpoint holds
    buf.flush(tracker.client, run_id)
    assert buf.items == []
    replay = MetricBuffer(saved)  # killed after the flush: the resumed run still holds these
    replay.add(3, train_loss=0.3)
    replay.drop_logged(tracker.client, run_id)
    replay.flush(tracker.client, run_id)
    history = tracker.client.get_metric_history(run_id, "train_loss")
    assert sorted(m.step for m in history) == [1, 2, 3]


def test_bundle_artifact_and_loss_plot(tracker, tmp_path):
    run_id = tracker.open(None)
    bundle = tmp_path / "bundle"
    (bundle / "base").mkdir(parents=True)
    (bundle / "adapters" / "style").mkdir(parents=True)
    (bundle / "base" / "config.json").write_text("{}")
    (bundle / "adapters" / "style" / "adapter_config.json").write_text("{}")
    (bundle / "tokenizer.json").write_text("{}")
    (bundle / "checkpoints").mkdir()  # not part of the bundle
    info = {"format": 1, "tokenizer": "tokenizer.json", "base": "base", "adapters": {"style": "adapters/style"}}
    (bundle / "bundle.json").write_text(json.dumps(info))
    log_bundle(tracker.client, run_id, bundle)
    listed = {a.path for a in tracker.client.list_artifacts(run_id, "bundle")}
    assert listed == {"bundle/base", "bundle/adapters", "bundle/tokenizer.json", "bundle/bundle.json"}

    MetricBuffer([["train_loss", 2.0, 1, 0], ["train_loss", 1.5, 2, 0], ["valid_loss", 1.7, 2, 0]]).flush(
        tracker.client, run_id
    )
    png = loss_plot(tracker.client, run_id, tmp_path / "loss.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
