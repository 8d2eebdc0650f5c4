"""TokenWindows and dataset_info: masks and labels from PAD, memory-mapped reads, the stage's report."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from pipeline.core.files import write_json
from pipeline.core.graph import run_stage
from pipeline.train.dataset import IGNORE_INDEX, TokenWindows, dataset_info, with_replay
from tests.pipeline.data.test_tokenize import make_corpus, tiny_config

PAD = 0


@pytest.fixture
def npy(tmp_path):
    windows = np.array([[1, 5, 6, 7, 8, 9], [7, 8, 9, 2, PAD, PAD]], dtype=np.int32)  # (2 windows, L=6)
    path = tmp_path / "train.npy"
    np.save(path, windows)
    return path, windows


def test_item_has_ids_mask_and_labels(npy):
    path, windows = npy
    ds = TokenWindows(path, pad_id=PAD)
    assert len(ds) == 2 and ds.seq_len == 6
    item = ds[1]
    assert all(v.dtype == torch.long and v.shape == (6,) for v in item.values())
    assert item["input_ids"].tolist() == windows[1].tolist()
    assert item["attention_mask"].tolist() == [1, 1, 1, 1, 0, 0]
    assert item["labels"].tolist() == [7, 8, 9, 2, IGNORE_INDEX, IGNORE_INDEX]
    assert ds[0]["attention_mask"].sum() == 6 and (ds[0]["labels"] == ds[0]["input_ids"]).all()


def test_reads_memory_mapped_and_batches(npy):
    path, _ = npy
    ds = TokenWindows(path, pad_id=PAD)
    assert isinstance(ds.windows, np.memmap)
    batch = next(iter(DataLoader(ds, batch_size=2)))
    assert batch["input_ids"].shape == (2, 6) and batch["labels"][1, -1] == IGNORE_INDEX
    ds[0]["input_ids"][0] = 99  # a returned tensor is a copy, never a view of the read-only map
    assert ds[0]["input_ids"][0] == 1


def test_empty_split(tmp_path):
    np.save(tmp_path / "test.npy", np.zeros((0, 8), dtype=np.int32))
    ds = TokenWindows(tmp_path / "test.npy", pad_id=PAD)
    assert len(ds) == 0 and ds.seq_len == 8


def test_rejects_a_flat_array(tmp_path):
    np.save(tmp_path / "bad.npy", np.arange(10, dtype=np.int32))
    with pytest.raises(ValueError, match="n_windows, max_seq_len"):
        TokenWindows(tmp_path / "bad.npy", pad_id=PAD)


def test_dataset_info_from_a_real_run(tmp_path):
    data = tmp_path / "data"
    make_corpus(data)
    run_stage("tokenize", tiny_config(data))
    info = dataset_info(data / "tokenize")
    assert info["max_seq_len"] == 32 and info["pad_id"] == 0 and info["kind"] == "MIDILike"
    assert info["tokenizer_path"].endswith("tokenizer.json")
    ds = TokenWindows(data / "tokenize" / "style" / "solo" / "train.npy", pad_id=info["pad_id"])
    assert len(ds) == info["splits"]["style/solo/train"]["windows"] and ds.seq_len == info["max_seq_len"]
    assert int(ds[0]["input_ids"].max()) < info["vocab_size"] and ds[0]["input_ids"][0] == info["bos_id"]


def test_dataset_info_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="run the tokenize stage"):
        dataset_info(tmp_path)
    write_json(tmp_path / "report.json", {"stats": {"vocab_size": 10}})
    with pytest.raises(ValueError, match="pad_id"):
        dataset_info(tmp_path)


def test_replay_mixes_a_fixed_share_of_base_windows(tmp_path):
    style, base = tmp_path / "style.npy", tmp_path / "base.npy"
    np.save(style, np.full((30, 4), 3, np.int32))
    np.save(base, np.arange(200 * 4, dtype=np.int32).reshape(200, 4) + 10)
    mixed = with_replay(TokenWindows(style, PAD), TokenWindows(base, PAD), 0.25, seed=7)
    rows = [mixed[i]["input_ids"].tolist() for i in range(len(mixed))]
    assert len(mixed) == 40 and sum(r == [3] * 4 for r in rows) == 30  # 10 of 40 windows are the base's
    again = with_replay(TokenWindows(style, PAD), TokenWindows(base, PAD), 0.25, seed=7)
    assert [again[i]["input_ids"].tolist() for i in range(len(again))] == rows  # the same sample on resume
    assert with_replay(TokenWindows(style, PAD), TokenWindows(base, PAD), 0.0, seed=7).__class__ is TokenWindows


def _batch(tmp_path: Path, windows: list[list[int]]) -> dict[str, torch.Tensor]:
    from pipeline.train.dataset import collate

    np.save(tmp_path / "w.npy", np.array(windows, np.int32))
    ds = TokenWindows(tmp_path / "w.npy", pad_id=PAD)
    return collate([ds[i] for i in range(len(ds))])


def test_right_padded_batches_train_without_the_mask(tmp_path):
    from pipeline.train.dataset import model_inputs
    from pipeline.train.model import Vocab, build_base
    from tests.pipeline.train.test_model import tiny_cfg

    batch = _batch(tmp_path, [[1, 5, 6, 7, 8, 9, 10], [1, 8, 9, 2, PAD, PAD, PAD], [1, 4, 4, PAD, PAD, PAD, PAD]])
    inputs = model_inputs(batch)
    assert "attention_mask" not in inputs and inputs["labels"] is batch["labels"]
    torch.manual_seed(0)
    model = build_base(tiny_cfg(tmp_path).model, Vocab(96, PAD, 1, 2), 32)
    losses, grads = [], []
    for kwargs in (batch, inputs):
        model.zero_grad()
        loss = model(**kwargs).loss
        loss.backward()
        losses.append(loss.detach())
        grads.append([p.grad.clone() for p in model.parameters()])
    assert torch.allclose(losses[0], losses[1], atol=1e-6)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(*grads, strict=True))


def test_a_pad_before_a_token_keeps_the_mask(tmp_path):
    from pipeline.train.dataset import model_inputs

    batch = _batch(tmp_path, [[1, 5, PAD, 6], [1, 5, 6, 7]])
    assert model_inputs(batch) is batch
