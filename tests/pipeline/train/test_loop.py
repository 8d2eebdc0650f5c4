"""The loop's precision: `auto` takes bf16 only where the training device computes it natively."""

from __future__ import annotations

import pytest

from pipeline.core import device
from pipeline.train.loop import resolve_precision


@pytest.mark.parametrize(("flags", "auto"), [("avx512f avx512_bf16", "bf16"), ("avx2 avx512f", "no")])
def test_auto_precision_follows_the_cpu(monkeypatch, tmp_path, flags, auto):
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"flags\t: fpu sse {flags}\n")
    monkeypatch.setattr(device, "CPUINFO", cpuinfo)
    assert resolve_precision("auto") == auto
    for explicit in ("no", "bf16", "fp16"):
        assert resolve_precision(explicit) == explicit
