"""bench/backends.py's decode step (what --aoti and --onnx compile) computes the lean forward: same logits, and the
new keys and values are the ones lean writes into its cache. Eager here: compiling takes a C++ build."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from realtime.bundle import load_model
from realtime.llama import LeanLlama
from tests.realtime.conftest import build_tiny_bundle

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import backends


def test_decode_step_is_the_lean_forward(tmp_path):
    lean = LeanLlama.from_module(load_model(build_tiny_bundle(tmp_path / "b", adapters=())))
    ids = torch.randint(3, lean.shape.vocab, (40,), generator=torch.Generator().manual_seed(0)).tolist()
    theirs, ours = lean.new_cache(64), lean.new_cache(64)
    lean.forward(ids[:30], theirs, keep=1)
    lean.forward(ids[:30], ours, keep=1)
    step = backends.CompiledStep(lean, "eager", tmp_path)
    with torch.inference_mode():
        for token in ids[30:]:
            expected, got = lean.forward([token], theirs)[0], step.step(token, ours)
            assert (expected - got).abs().max() < 1e-4
    assert ours.length == theirs.length == 40
    assert (ours.kv[:, :, :, :40] - theirs.kv[:, :, :, :40]).abs().max() < 1e-5
