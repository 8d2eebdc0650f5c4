"""The pickle-free checkpoint state: JSON + safetensors round trips, and what loading refuses."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from pipeline.train.checkpoint import CheckpointError
from pipeline.train.state import UnsafeCheckpoint, read_part, refuse_unsafe, write_part


def test_parts_round_trip_keys_tuples_arrays_and_tensors(tmp_path):
    state = {
        "state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.randn(2, 3)}, 1: {}},  # int keys (optimizer)
        "param_groups": [{"params": [0, 1], "betas": (0.9, 0.95), "lr": 1e-3, "foreach": None}],
        "numpy": ("MT19937", np.arange(4, dtype=np.uint32), 2, 0, 0.0),
        "rng": torch.get_rng_state(),
    }
    write_part(tmp_path, "opt", state)
    assert {p.name for p in tmp_path.iterdir()} == {"opt.json", "opt.safetensors"}
    back = read_part(tmp_path, "opt")
    assert set(back["state"]) == {0, 1} and back["param_groups"][0]["betas"] == (0.9, 0.95)
    assert torch.equal(back["state"][0]["exp_avg"], state["state"][0]["exp_avg"])
    assert back["state"][0]["step"].shape == () and float(back["state"][0]["step"]) == 3.0
    assert back["numpy"][1].dtype == np.uint32 and back["numpy"][1].tolist() == [0, 1, 2, 3]
    assert torch.equal(back["rng"], state["rng"])
    write_part(tmp_path, "plain", {"step": 4, "run_id": "abc"})  # no tensors: no safetensors file
    assert not (tmp_path / "plain.safetensors").exists() and read_part(tmp_path, "plain")["step"] == 4


def test_what_cannot_be_stored_without_pickling_is_an_error(tmp_path):
    with pytest.raises(CheckpointError, match="cannot store a object"):
        write_part(tmp_path, "bad", {"x": object()})


def test_refuse_unsafe_by_name_and_by_content(tmp_path):
    write_part(tmp_path, "ok", {"t": torch.ones(2)})
    refuse_unsafe(tmp_path)  # JSON and safetensors only: accepted
    torch.save({"a": 1}, tmp_path / "random_states_0.pkl")
    with pytest.raises(UnsafeCheckpoint, match=r"random_states_0\.pkl may be a pickle"):
        refuse_unsafe(tmp_path)
    (tmp_path / "random_states_0.pkl").rename(tmp_path / "rng-0.json")  # a torch.save zip under a safe name
    with pytest.raises(UnsafeCheckpoint, match=r"rng-0\.json"):
        refuse_unsafe(tmp_path)
    (tmp_path / "rng-0.json").write_text(json.dumps({"__weird__": 1}))
    refuse_unsafe(tmp_path)
    with pytest.raises(UnsafeCheckpoint, match="unknown entry"):
        read_part(tmp_path, "rng-0")
