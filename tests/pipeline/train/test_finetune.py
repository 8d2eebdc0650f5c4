"""Stages end to end on tiny synthetic data: pretrain -> QLoRA fine-tune -> bundle in MLflow; bad inputs fail early."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from pipeline.core.config import ConfigError, config_from_dict
from pipeline.core.graph import run_stage
from pipeline.registry.client import mlflow_client
from pipeline.registry.tracking import BASE_PATH_TAG, BASE_RUN_TAG, ROLE_TAG
from pipeline.train.dataset import TrainInputError
from pipeline.train.model import VocabMismatch
from realtime.bundle import load_model
from tests.pipeline.train.test_model import SEQ, VOCAB, tiny_cfg, token_windows, write_base_bundle, write_token_data

METRICS = {"train_loss", "valid_loss", "lr", "tokens_per_s", "peak_mem_mb"}


def _runs(cfg, role: str) -> list:
    client = mlflow_client(cfg)
    exp = client.get_experiment_by_name(cfg.project.name)
    return client.search_runs([exp.experiment_id], f"tags.`{ROLE_TAG}` = '{role}'")


def test_pretrain_then_finetune_bundle_in_mlflow(tmp_path):
    import mlflow

    cfg = tiny_cfg(tmp_path)
    write_token_data(cfg.project.data_dir)
    base_report = run_stage("pretrain", cfg)
    assert (cfg.stage_dir("pretrain") / "base" / "config.json").is_file()
    report = run_stage("finetune", cfg)
    assert report.stats["style"]["steps"] == cfg.finetune.max_steps and report.processed == ["style"]

    (base_run,) = _runs(cfg, "base")
    (run,) = _runs(cfg, "finetune")
    assert base_run.info.run_id == base_report.stats["run_id"] and run.info.status == "FINISHED"
    assert run.data.tags[BASE_RUN_TAG] == base_run.info.run_id
    assert {"git_commit", "data_version", "tokenizer_sha256"} <= set(run.data.tags)
    assert run.data.params["finetune.lora_r"] == "4" and run.data.params["finetune.quantization"] == "nf4"
    assert set(run.data.metrics) >= METRICS and set(base_run.data.metrics) >= METRICS
    artifacts = {a.path for a in mlflow_client(cfg).list_artifacts(run.info.run_id)}
    assert {"bundle", "config.json", "loss.png"} <= artifacts

    local = tmp_path / "downloaded"
    mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="bundle", dst_path=str(local))
    info = json.loads((local / "bundle" / "bundle.json").read_text())
    assert info["adapters"] == {"style": "adapters/style"} and info["source_run_id"] == run.info.run_id
    assert info["step"] == cfg.finetune.max_steps and info["metrics"]["train_loss"] > 0
    assert info["config"]["finetune"]["lora_r"] == 4 and info["config"] == cfg.model_dump(mode="json")
    tok_report = json.loads((cfg.stage_dir("tokenize") / "report.json").read_text())
    assert info["max_note_beats"] == tok_report["stats"]["note_lengths"]["max_note_beats"] > 0  # for the runner
    assert info["max_polyphony"] == tok_report["stats"]["polyphony"]["max_polyphony"] >= 1
    fingerprints = base_report.stats["fingerprint"][:8], report.stats["style"]["fingerprint"][:8]
    assert base_run.info.run_name == f"pretrain-{fingerprints[0]}"
    assert run.info.run_name == f"finetune-style-r4-{fingerprints[1]}"
    ids = torch.from_numpy(token_windows(2, 5, 3)).long()
    with torch.no_grad():
        logged = load_model(local / "bundle")(input_ids=ids).logits
        on_disk = load_model(cfg.stage_dir("finetune") / "bundle")(input_ids=ids).logits
        base = load_model(local / "bundle", adapters={})(input_ids=ids).logits
    torch.testing.assert_close(logged, on_disk)
    assert (logged - base).abs().max() > 0  # the adapter moved

    again = run_stage("finetune", cfg)  # up to date: nothing trained, no new run
    assert again.cached == ["style"] and len(_runs(cfg, "finetune")) == 1
    fresh = run_stage("finetune", tiny_cfg(tmp_path, finetune={"max_steps": 3}), fresh=True)
    assert fresh.stats["style"]["run_id"] != run.info.run_id and len(_runs(cfg, "finetune")) == 2


def test_one_adapter_per_style_then_one_bundle_holding_them_all(tmp_path):
    styles = config_from_dict({"styles": {"jazz": {"sources": ["a"]}, "folk": {"sources": ["b"]}}}).styles
    cfg = tiny_cfg(tmp_path, finetune={"max_steps": 4}).model_copy(update={"styles": styles})
    write_token_data(cfg.project.data_dir, styles=("jazz", "folk"))
    run_stage("pretrain", cfg)
    report = run_stage("finetune", cfg)
    assert report.processed == ["jazz", "folk"]
    runs = {r.data.tags["jam.style"]: r for r in _runs(cfg, "finetune")}
    assert sorted(runs) == ["folk", "jazz"] and runs["jazz"].info.run_name.startswith("finetune-jazz-r4-")
    assert runs["jazz"].data.tags[BASE_RUN_TAG] == runs["folk"].data.tags[BASE_RUN_TAG]
    info = json.loads((cfg.stage_dir("finetune") / "bundle" / "bundle.json").read_text())
    assert info["adapters"] == {"jazz": "adapters/jazz", "folk": "adapters/folk"} and info["default_adapter"] == "jazz"
    assert {s: v["source_run_id"] for s, v in info["styles"].items()} == {s: r.info.run_id for s, r in runs.items()}
    ids = torch.from_numpy(token_windows(2, 5, 3)).long()
    with torch.no_grad():
        combined = cfg.stage_dir("finetune") / "bundle"
        for style in ("jazz", "folk"):  # each adapter in the combined bundle is exactly its own run's
            alone = load_model(cfg.stage_dir("finetune") / style / "bundle")(input_ids=ids).logits
            torch.testing.assert_close(load_model(combined, adapters={style: 1.0})(input_ids=ids).logits, alone)
    again = run_stage("finetune", cfg)
    assert again.cached == ["jazz", "folk"] and len(_runs(cfg, "finetune")) == 2


def test_base_from_a_local_folder(tmp_path):
    cfg = tiny_cfg(tmp_path / "elsewhere")
    write_token_data(cfg.project.data_dir)
    folder = write_base_bundle(cfg)  # a bundle made by another project checkout
    cfg = tiny_cfg(tmp_path, pretrain={"source": "path", "path": str(folder)}, finetune={"max_steps": 3})
    write_token_data(cfg.project.data_dir)
    run_stage("pretrain", cfg)
    info = json.loads((cfg.stage_dir("pretrain") / "bundle.json").read_text())
    assert info["base_path"] == str(folder.resolve()) and info["adapters"] == {}
    run_stage("finetune", cfg)
    (run,) = _runs(cfg, "finetune")
    assert run.data.tags[BASE_PATH_TAG] == str(folder.resolve())


def _empty_style(cfg):
    np.save(cfg.stage_dir("tokenize") / "style" / "style" / "train.npy", np.zeros((0, SEQ), np.int32))


def _ids_out_of_vocab(cfg):
    windows = token_windows(8, 5, 0)
    windows[3, 4] = VOCAB.size + 7
    np.save(cfg.stage_dir("tokenize") / "style" / "style" / "train.npy", windows)


def _other_vocab_base(cfg):
    report = cfg.stage_dir("tokenize") / "report.json"
    tree = json.loads(report.read_text())
    tree["stats"]["vocab_size"] = VOCAB.size + 32
    report.write_text(json.dumps(tree))


BAD = {
    "empty dataset": (_empty_style, {}, TrainInputError, "empty dataset"),
    "missing dataset": (lambda c: (c.stage_dir("tokenize") / "style" / "style" / "train.npy").unlink(), {},
                        TrainInputError, "missing dataset"),
    "ids out of vocab": (_ids_out_of_vocab, {}, TrainInputError, "outside the vocabulary"),
    "vocab mismatch": (_other_vocab_base, {}, VocabMismatch, "vocab_size 96 != tokenizer vocab_size 128"),
    "batch too large": (None, {"batch_size": 64, "replay": 0.0}, TrainInputError,
                        "larger than the 32 training windows"),
    # 32 style windows + 11 replayed base windows
    "batch too large with replay": (None, {"batch_size": 64, "replay": 0.25}, TrainInputError,
                                    "larger than the 43 training windows"),
    "no base": (lambda c: (c.stage_dir("pretrain") / "bundle.json").unlink(), {}, TrainInputError,
                "jam train --stage pretrain"),
    "fp16 on cpu": (None, {"mixed_precision": "fp16"}, TrainInputError, "needs CUDA"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(BAD))
def test_bad_inputs_fail_before_training(tmp_path, case):
    if case == "fp16 on cpu" and torch.cuda.is_available():
        pytest.skip("fp16 is fine with CUDA")
    damage, finetune, error, message = BAD[case]
    cfg = tiny_cfg(tmp_path, finetune=finetune)
    write_token_data(cfg.project.data_dir)
    write_base_bundle(cfg)
    if damage:
        damage(cfg)
    with pytest.raises(error, match=message):
        run_stage("finetune", cfg)
    assert not (cfg.stage_dir("checkpoints") / "finetune").exists()


@pytest.mark.parametrize(
    "section", [{"finetune": {"lora_r": 0}}, {"finetune": {"batch_size": 0}}, {"pretrain": {"warmup_steps": 9}}]
)
def test_impossible_params_are_config_errors(tmp_path, section):
    with pytest.raises(ConfigError):
        tiny_cfg(tmp_path, **section)


def test_missing_tokenize_stage(tmp_path):
    with pytest.raises(TrainInputError, match="jam stage tokenize"):
        run_stage("pretrain", tiny_cfg(tmp_path))
