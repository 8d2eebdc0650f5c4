"""Evaluation end to end on a tiny random bundle and a tiny test split, plus its small pure parts."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

from pipeline.core.config import Config, config_from_dict
from pipeline.core.files import write_json
from pipeline.core.graph import io as graph_io
from pipeline.core.graph import run_stage
from pipeline.core.items import AllItemsFailed
from pipeline.evaluate import features as F
from pipeline.evaluate.stage import mean_nll
from pipeline.evaluate.testset import EvaluateError, load_eval_data
from pipeline.registry.client import mlflow_client
from tests.pipeline.registry.test_promote import fake_run, make_store

L = 48  # tokens per test window


def _piece(path: Path, seed: int, n: int = 40, low: int = 55, steps: tuple[int, ...] = (0, 240, 480)) -> Path:
    from symusic import Note, Score, Tempo, Track

    rng = np.random.default_rng(seed)
    score, track, tick = Score(480), Track(program=0), 0
    for _ in range(n):
        dur = int(rng.choice([120, 240, 480]))
        track.notes.append(Note(tick, dur, int(rng.integers(low, low + 25)), int(rng.integers(50, 100))))
        tick += int(rng.choice(steps))
    score.tracks.append(track)
    score.tempos.append(Tempo(0, 100.0))
    path.parent.mkdir(parents=True, exist_ok=True)
    score.dump_midi(str(path))
    return path


def _tokenizer(paths: list[Path]):
    import miditok

    config = miditok.TokenizerConfig(
        pitch_range=(21, 109),
        beat_res={(0, 4): 8, (4, 12): 4},
        num_velocities=16,
        special_tokens=["PAD", "BOS", "EOS"],
        use_programs=False,
    )
    tok = miditok.MIDILike(config)
    tok.train(vocab_size=len(tok) + 20, model="BPE", files_paths=paths)
    return tok


def _windows(tok, paths: list[Path]) -> np.ndarray:
    rows = []
    for path in paths:
        ids = [1] + [i for s in tok.encode(path) for i in s.ids] + [2]  # BOS + piece + EOS
        for start in range(0, len(ids), L):
            row = np.zeros(L, np.int32)  # PAD = 0
            chunk = ids[start : start + L]
            row[: len(chunk)] = chunk
            rows.append(row)
    return np.stack(rows)


def _bundles(root: Path, tok_file: Path, vocab: int) -> tuple[Path, Path]:
    """(base bundle, fine-tune bundle): a tiny random Llama and a random LoRA adapter named `style`."""
    import shutil

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=128,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    model = LlamaForCausalLM(config)
    base, ft = root / "base_bundle", root / "ft_bundle"
    for folder, adapters in ((base, {}), (ft, {"style": "adapters/style"})):
        model.save_pretrained(folder / "base")
        shutil.copy(tok_file, folder / "tokenizer.json")
        info = {
            "format": 1,
            "tokenizer": "tokenizer.json",
            "base": "base",
            "adapters": adapters,
            "default_adapter": "style" if adapters else None,
            "tempo_bpm": 120.0,
            "max_seq_len": 64,
        }
        write_json(folder / "bundle.json", info)
    lora = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    get_peft_model(model, lora).save_pretrained(ft / "adapters" / "style")
    return base, ft


# Two styles that a listener tells apart: "low" plays low, long and in chords, "high" runs high and even.
STYLES = {"low": {"low": 40, "steps": (0, 0, 480, 960)}, "high": {"low": 70, "steps": (120, 240)}}


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> tuple[Config, dict[str, str]]:
    """Tiny data tree (clean pieces of two styles, split, tokenizer, test windows) and a store with base and
    fine-tune runs (one per style)."""
    root = tmp_path_factory.mktemp("evaluate")
    cfg = make_store(root, "jam-eval")
    data = root / "data"
    split, pieces = {}, {}
    for k, (style, shape) in enumerate(STYLES.items()):
        ids = [f"{style}{i}" for i in range(6)]
        pieces[style] = [_piece(data / "clean" / "style" / f"{i}.mid", 10 * k + j, **shape) for j, i in enumerate(ids)]
        split[style] = {"train": ids[:4], "valid": [], "test": ids[4:]}
    tok = _tokenizer([p for ps in pieces.values() for p in ps])
    tok_file = data / "tokenize" / "tokenizer.json"
    tok.save(tok_file)
    for style, paths in pieces.items():
        (data / "tokenize" / "style" / style).mkdir(parents=True)
        np.save(data / "tokenize" / "style" / style / "test.npy", _windows(tok, paths[4:]))
    write_json(data / "tokenize" / "report.json", {"stats": {"pad_id": 0, "bos_id": 1, "eos_id": 2}})
    write_json(data / "split" / "split.json", {"base": {}, "styles": split})
    base_bundle, ft_bundle = _bundles(root, tok_file, len(tok))
    runs = {"base": fake_run(cfg, "base", bundle=base_bundle)}
    for style in STYLES:
        runs[style] = fake_run(cfg, "finetune", base_run_id=runs["base"], bundle=ft_bundle,
                               params={"finetune.lora_r": "2"}, tags={"jam.style": style})  # fmt: skip
    runs["broken"] = fake_run(cfg, "finetune", base_run_id=runs["base"], bundle=False, tags={"jam.style": "low"})
    tree = cfg.model_dump(mode="json")
    tree["styles"] = {style: {"sources": [f"in/{style}"]} for style in STYLES}
    tree["evaluate"] = {
        "n_prompts": 2,
        "prompt_tokens": 8,
        "seeds": [0, 1],
        "n_tokens": 24,
        "max_windows": 4,
        "batch_size": 4,
        "plots": 1,
    }
    return config_from_dict(tree), runs


def test_evaluate_end_to_end(world):
    cfg, runs = world
    report = run_stage("evaluate", cfg)
    assert sorted(report.processed) == sorted([runs["low"], runs["high"]])
    assert "no 'bundle' artifact" in report.failed[runs["broken"]]
    assert report.stats["base_runs_logged"] == [runs["base"]]
    assert report.stats["attribution"].startswith("held-out test pieces attributed correctly: 1.00")

    client = mlflow_client(cfg)
    ft = client.get_run(runs["low"]).data
    for name in (
        "test_nll",
        "test_ppl",
        "base_test_nll",
        "nll_ratio",
        "validity_rate",
        "style_score",
        "base_style_score",
        "base_validity_rate",
        "style_attribution",
        "style_attribution_ci_low",
        "style_attribution_ci_high",
        "base_style_attribution",
        "style_attribution_real",
        "style_attribution_real_passages",
        "out_of_key",
        "out_of_key_real",
        "attribution_classifier_accuracy",
        *(f"oa_{f}" for f in F.FEATURES),
        *(f"base_oa_{f}" for f in F.FEATURES),
    ):
        assert name in ft.metrics, name
    m = ft.metrics
    assert m["test_ppl"] == pytest.approx(math.exp(m["test_nll"]), rel=1e-6)
    assert m["nll_ratio"] == pytest.approx(m["test_nll"] / m["base_test_nll"], rel=1e-6)
    assert 0.0 <= m["validity_rate"] <= 1.0 and 0.0 <= m["style_score"] <= 1.0
    assert m["style_attribution_ci_low"] <= m["style_attribution"] <= m["style_attribution_ci_high"]
    assert 0.0 <= m["style_attribution_real"] <= 1.0 and m["style_attribution_real_passages"] >= 1
    assert 0.0 <= m["out_of_key"] <= 1.0 and 0.0 <= m["out_of_key_real"] <= 1.0
    assert m["test_nll"] != m["base_test_nll"]  # the adapter changes the model
    assert ft.tags["jam.eval_key"] == report.stats["eval_key"]
    high = client.get_run(runs["high"]).data.metrics  # same bundle, other style: other test set, same samples
    assert high["test_nll"] != m["test_nll"] and high["validity_rate"] == m["validity_rate"]
    # every sample goes to one style or none: the two styles' shares of one model's samples add up to at most 1
    assert m["style_attribution"] + high["style_attribution"] <= 1.0 + 1e-9

    files = {a.path for a in client.list_artifacts(runs["low"], "eval")}
    assert {"eval/features_oa.png", "eval/features_hist.png", "eval/samples.json", "eval/metrics.json"} <= files
    assert sum(f.startswith("eval/pianoroll_") for f in files) == 1
    samples = json.loads(Path(client.download_artifacts(runs["low"], "eval/samples.json")).read_text())
    assert len(samples) == 8 and {s["seed"] for s in samples} == {0, 1}  # 2 prompts x 2 styles x 2 seeds
    assert [s["prompt_style"] for s in samples[:4]] == ["low", "high", "low", "high"]  # drawn equally, interleaved
    if any(s["notes"] for s in samples):
        assert client.list_artifacts(runs["low"], "eval/samples")

    base = client.get_run(runs["base"]).data
    assert base.metrics["low/test_nll"] == pytest.approx(m["base_test_nll"])
    assert base.metrics["high/test_nll"] == pytest.approx(high["base_test_nll"])
    assert "nll_ratio" not in base.metrics and "low/nll_ratio" not in base.metrics

    again = run_stage("evaluate", cfg)  # same params: evaluated runs are skipped, the broken one still reported
    assert sorted(again.cached) == sorted([runs["low"], runs["high"]]) and not again.processed
    assert list(again.failed) == [runs["broken"]]

    base_only = run_stage("evaluate", cfg, run_id=runs["base"], force=True)  # a base run alone: every style
    assert base_only.processed == [runs["base"]]
    assert base_only.stats[runs["base"]]["low/test_nll"] == pytest.approx(m["base_test_nll"])
    assert "nll_ratio" not in base_only.stats[runs["base"]]


def test_a_run_of_a_style_no_longer_configured_fails_clearly(world):
    cfg, runs = world
    only_low = cfg.model_copy(update={"styles": {"low": cfg.styles["low"]}})
    with pytest.raises(AllItemsFailed, match=r"style 'high' is not under params\.yaml's styles \['low'\]"):
        run_stage("evaluate", only_low, run_id=runs["high"], force=True)


def test_evaluate_a_run_without_bundle_fails_clearly(world):
    cfg, runs = world
    with pytest.raises(AllItemsFailed, match="no 'bundle' artifact"):
        run_stage("evaluate", cfg, run_id=runs["broken"])


def test_cli_evaluate_reports_missing_data(tmp_path):
    import yaml
    from typer.testing import CliRunner

    from pipeline.cli import app

    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"project": {"data_dir": str(tmp_path / "data")}}))
    result = CliRunner().invoke(app, ["evaluate", "-p", str(params)])
    assert result.exit_code == 1 and "run `jam stage tokenize` first" in result.output


def test_empty_test_split_is_a_clear_error(world, tmp_path):
    cfg, _ = world
    tree = cfg.model_dump(mode="json")
    tree["project"]["data_dir"] = str(tmp_path / "data")
    empty = config_from_dict(tree)
    (tmp_path / "data" / "tokenize").mkdir(parents=True)
    shutil.copy(cfg.stage_dir("tokenize") / "tokenizer.json", tmp_path / "data" / "tokenize" / "tokenizer.json")
    split = {"low": {"train": ["a"], "valid": [], "test": []}, "high": {"test": ["b"]}}
    write_json(tmp_path / "data" / "split" / "split.json", {"styles": split})
    with pytest.raises(EvaluateError, match=r"empty test split: split\.json lists no test pieces of style 'low'"):
        run_stage("evaluate", empty)
    write_json(
        tmp_path / "data" / "split" / "split.json", {"styles": {"low": {"test": ["a"]}, "high": {"test": ["b"]}}}
    )
    with pytest.raises(EvaluateError, match="jam stage tokenize"):
        load_eval_data(empty, graph_io(empty, "evaluate")[0])
    write_json(tmp_path / "data" / "split" / "split.json", {"styles": {"low": {"test": ["a"]}}})
    with pytest.raises(EvaluateError, match=r"split.json has no style \['high'\]"):
        load_eval_data(empty, graph_io(empty, "evaluate")[0])


def test_mean_nll_of_uniform_model_is_log_vocab():
    import torch

    class Uniform(torch.nn.Module):
        def forward(self, input_ids, attention_mask):
            return type("Out", (), {"logits": torch.zeros(*input_ids.shape, 10)})()

    windows = np.array([[1, 5, 6, 2, 0, 0], [1, 7, 8, 9, 4, 2]], np.int32)
    assert mean_nll(Uniform(), windows, pad_id=0, batch_size=1) == pytest.approx(math.log(10))
