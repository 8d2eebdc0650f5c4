"""Native bfloat16 detection: the one answer `auto` precisions (transcription, training) are resolved from."""

from __future__ import annotations

from pipeline.core import device


def test_native_bf16_on_cpu_follows_the_instruction_set(monkeypatch, tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    monkeypatch.setattr(device, "CPUINFO", cpuinfo)
    cpuinfo.write_text("flags\t: fpu sse avx2 avx512f avx512_bf16\n")
    assert device.native_bf16("cpu")
    cpuinfo.write_text("flags\t: fpu sse avx2 amx_bf16 amx_tile\n")
    assert device.native_bf16("cpu")
    cpuinfo.write_text("flags\t: fpu sse avx2 avx512f\n")  # emulated bfloat16: slower than float32
    assert not device.native_bf16("cpu")
    monkeypatch.setattr(device, "CPUINFO", tmp_path / "absent")  # not Linux: the safe answer
    assert not device.native_bf16("cpu")
