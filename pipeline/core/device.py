"""What the hardware computes natively: the one place `auto` precisions are resolved (transcription, training)."""

from __future__ import annotations

from pathlib import Path

CPUINFO = Path("/proc/cpuinfo")  # Linux; elsewhere no way to tell, so the safe answer (float32) is taken
BF16_CPU_FLAGS = (" avx512_bf16", " amx_bf16")  # x86 instructions that compute bfloat16 (AVX-512 BF16, AMX)


def native_bf16(device_type: str) -> bool:
    """True where `device_type` ("cpu" or "cuda") computes bfloat16 natively; emulated bfloat16 is slower than fp32.

    A CUDA GPU that supports it (Ampere or newer); a CPU with AVX-512 BF16 or AMX.
    """
    if device_type == "cuda":
        import torch

        return torch.cuda.is_bf16_supported()
    try:
        flags = CPUINFO.read_text()
    except OSError:
        return False
    return any(flag in flags for flag in BF16_CPU_FLAGS)
