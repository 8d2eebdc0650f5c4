"""Base model, 4-bit loading, LoRA and the model bundle. Also the synthetic token data the training tests share."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from pipeline.core.config import Config, config_from_dict
from pipeline.train.model import (
    Vocab,
    VocabMismatch,
    add_lora,
    build_base,
    check_tokenizer_files,
    check_vocab,
    load_base,
)
from realtime.bundle import load_model
from realtime.bundle_format import read_bundle, write_bundle

VOCAB = Vocab(size=96, pad_id=0, bos_id=1, eos_id=2)
SEQ = 32  # tokens per window in the synthetic data

# A model small enough that a training step takes milliseconds on one CPU core.
TINY = {
    "project": {"data_dir": "data", "mlflow_uri": "sqlite:///mlruns/mlflow.db", "artifact_dir": "mlruns/artifacts"},
    "styles": {"style": {"sources": ["data/demo/audio"]}},  # one style named "style"; its windows come from tests
    "tokenize": {"max_seq_len": SEQ, "overlap": 8},
    "model": {"hidden_size": 32, "num_layers": 2, "num_heads": 2, "intermediate_size": 64},
    "pretrain": {"batch_size": 4, "max_steps": 8, "warmup_steps": 2, "eval_every": 4, "system_metrics": False},
    "finetune": {"batch_size": 4, "max_steps": 8, "warmup_steps": 2, "eval_every": 4, "system_metrics": False},
    "checkpoint": {"every_steps": 4, "every_s": 3600},
}


def _merge(tree: dict, over: dict) -> dict:
    out = copy.deepcopy(tree)
    for key, value in over.items():
        out[key] = _merge(out.get(key, {}), value) if isinstance(value, dict) else value
    return out


def tiny_tree(root: Path, **over: dict) -> dict:
    """The TINY params with every path under `root` and `over` merged in (section -> {key: value})."""
    tree = _merge(TINY, over)
    tree["project"] = {
        **tree["project"],
        "data_dir": str(root / "data"),
        "mlflow_uri": f"sqlite:///{root}/mlruns/mlflow.db",
        "artifact_dir": str(root / "mlruns" / "artifacts"),
    }
    return tree


def tiny_cfg(root: Path, **over: dict) -> Config:
    return config_from_dict(tiny_tree(root, **over))


def write_params(root: Path, **over: dict) -> Path:
    path = root / "params.yaml"
    path.write_text(yaml.safe_dump(tiny_tree(root, **over)))
    return path


def token_windows(n: int, stride: int, seed: int, seq: int = SEQ, vocab: Vocab = VOCAB) -> np.ndarray:
    """(n, seq) int32 windows: BOS then a noisy arithmetic progression of ids; every 4th right-padded to half."""
    rng = np.random.default_rng(seed)
    out = np.full((n, seq), vocab.pad_id, np.int32)
    first = 3  # ids below are special
    for i in range(n):
        length = seq if i % 4 else seq // 2
        start = rng.integers(0, vocab.size - first)
        body = first + (start + stride * np.arange(length - 1) + rng.integers(0, 2, length - 1)) % (vocab.size - first)
        out[i, 0], out[i, 1:length] = vocab.bos_id, body
    return out


def write_token_data(
    data_dir: Path, n_base: int = 32, n_style: int = 32, vocab: Vocab = VOCAB, styles: tuple[str, ...] = ("style",)
) -> Path:
    """What the tokenize stage leaves in `data_dir/tokenize`: tokenizer.json, report.json, base/<split>.npy and
    style/<name>/<split>.npy for each of `styles` (each its own progression stride)."""
    tok = data_dir / "tokenize"
    tok.mkdir(parents=True, exist_ok=True)
    (tok / "tokenizer.json").write_text(json.dumps({"synthetic": True, "vocab_size": vocab.size}))
    stats = {"vocab_size": vocab.size, "pad_id": vocab.pad_id, "bos_id": vocab.bos_id, "eos_id": vocab.eos_id,
             "kind": "MIDILike", "max_seq_len": SEQ, "overlap": 8, "tokenizer_sha256": "0" * 64,
             "note_lengths": {"notes": 100, "quantile": 0.995, "max_note_beats": 6.0},
             "polyphony": {"onsets": 80, "quantile": 0.995, "max_polyphony": 7}}  # fmt: skip
    (tok / "report.json").write_text(json.dumps({"stage": "tokenize", "stats": stats}))
    corpora = [("base", n_base, 3, 0)] + [(f"style/{name}", n_style, 5 + 2 * i, 1 + i) for i, name in enumerate(styles)]
    for corpus, n, stride, seed in corpora:
        (tok / corpus).mkdir(parents=True, exist_ok=True)
        np.save(tok / corpus / "train.npy", token_windows(n, stride, seed))
        np.save(tok / corpus / "valid.npy", token_windows(max(4, n // 8), stride, seed + 10))
    return tok


def write_base_bundle(cfg: Config, seed: int = 0) -> Path:
    """An untrained base bundle in `data/pretrain` (what the pretrain stage writes), without training or MLflow."""
    torch.manual_seed(seed)
    out = cfg.stage_dir("pretrain")
    model = build_base(cfg.model, VOCAB, cfg.tokenize.max_seq_len)
    model.save_pretrained(out / ".base")
    tok = cfg.stage_dir("tokenize") / "tokenizer.json"
    write_bundle(out, out / ".base", tok, {}, source_run_id="", max_seq_len=cfg.tokenize.max_seq_len)
    return out


def write_project(root: Path, **over: dict) -> Path:
    """A new project folder `root` as the stages before fine-tuning leave it: token data, an untrained base bundle
    and params.yaml, all with the TINY params and `over` merged in."""
    root.mkdir()
    write_token_data(root / "data")
    write_base_bundle(tiny_cfg(root, **over), seed=0)
    write_params(root, **over)
    return root


# ---- tests ------------------------------------------------------------------------------------------------------


def test_build_base_follows_config_and_vocab(tmp_path):
    cfg = tiny_cfg(tmp_path)
    model = build_base(cfg.model, VOCAB, SEQ)
    assert model.config.vocab_size == VOCAB.size and model.config.pad_token_id == VOCAB.pad_id
    assert model.config.num_hidden_layers == 2 and model.config.max_position_embeddings == SEQ
    ids = torch.from_numpy(token_windows(2, 3, 0)).long()
    assert model(input_ids=ids).logits.shape == (2, SEQ, VOCAB.size)


def test_vocab_mismatch_is_an_error(tmp_path):
    model = build_base(tiny_cfg(tmp_path).model, VOCAB, SEQ)
    with pytest.raises(VocabMismatch, match="vocab_size 96 != tokenizer vocab_size 100"):
        check_vocab(model.config, Vocab(100, 0, 1, 2), "base")
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text('{"x": 1}')
    b.write_text('{"x":  1}')  # same content, other bytes
    check_tokenizer_files(a, b)
    b.write_text('{"x": 2}')
    with pytest.raises(VocabMismatch, match="differs"):
        check_tokenizer_files(a, b)


def test_nf4_base_on_cpu_trains_only_the_adapter(tmp_path):
    cfg = tiny_cfg(tmp_path)
    torch.manual_seed(0)
    build_base(cfg.model, VOCAB, SEQ).save_pretrained(tmp_path / "base")
    full = load_base(tmp_path / "base")
    q4 = load_base(tmp_path / "base", "nf4", double_quant=True, compute_dtype="float32")
    assert type(q4.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
    assert q4.model.layers[0].self_attn.q_proj.weight.dtype == torch.uint8  # packed 4-bit
    ids = torch.from_numpy(token_windows(2, 3, 0)).long()
    with torch.no_grad():
        diff = (q4(input_ids=ids).logits - full(input_ids=ids).logits).abs().max()
    assert 0 < diff < 1.0  # quantized: close, not equal
    peft_model = add_lora(q4, cfg.finetune)
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or "trainable_tokens_delta" in n for n in trainable)
    assert any("trainable_tokens_delta" in n for n in trainable)  # finetune.train_embeddings: the embedding learns
    no_emb = add_lora(load_base(tmp_path / "base", "nf4"), cfg.finetune.model_copy(update={"train_embeddings": False}))
    assert all("lora_" in n for n, p in no_emb.named_parameters() if p.requires_grad)
    loss = peft_model(input_ids=ids, labels=ids).loss
    loss.backward()
    assert all(p.grad is not None for p in peft_model.parameters() if p.requires_grad)


def test_unknown_target_module_is_a_clear_error(tmp_path):
    cfg = tiny_cfg(tmp_path, finetune={"target_modules": ["q_proj", "query"]})
    with pytest.raises(ValueError, match=r"\['query'\]"):
        add_lora(build_base(cfg.model, VOCAB, SEQ), cfg.finetune)


def test_bundle_round_trip_gives_the_same_logits(tmp_path):
    cfg = tiny_cfg(tmp_path)
    torch.manual_seed(0)
    base = build_base(cfg.model, VOCAB, SEQ)
    base.save_pretrained(tmp_path / "saved_base")
    model = add_lora(base, cfg.finetune)
    with torch.no_grad():  # B starts at zero and the token rows at the base's: make the adapter matter
        for name, p in model.named_parameters():
            if "lora_B" in name or "trainable_tokens_delta" in name:
                p.add_(torch.randn_like(p) * 0.5)
    model.save_pretrained(tmp_path / "adapter", save_embedding_layers=False)
    (tmp_path / "tokenizer.json").write_text("{}")
    write_bundle(tmp_path / "bundle", tmp_path / "saved_base", tmp_path / "tokenizer.json",
                 {"style": tmp_path / "adapter"}, tempo_bpm=100.0)  # fmt: skip
    info = read_bundle(tmp_path / "bundle")
    assert info["format"] == 1 and info["default_adapter"] == "style"
    assert info["adapters"] == {"style": "adapters/style"}
    assert (tmp_path / "bundle" / "base" / "config.json").is_file()
    ids = torch.from_numpy(token_windows(2, 3, 0)).long()
    model.eval()
    with torch.no_grad():
        want = model(input_ids=ids).logits
        got = load_model(tmp_path / "bundle")(input_ids=ids).logits
        plain = load_model(tmp_path / "bundle", adapters={})(input_ids=ids).logits
    torch.testing.assert_close(got, want)
    assert (plain - want).abs().max() > 1e-3  # the adapter is really applied
