"""The forward's projections, x @ W.T over weights stored (in, out): float32 on MKL or oneDNN, or fbgemm's int8.

`cpu_gemm` picks the float32 CPU library by vendor: torch's float32 matmul is MKL's, whose AVX-512 kernels run on
Intel CPUs only. oneDNN builds a primitive per row count the first time it sees one (~0.4 ms each, 4 per prefill
shape measured on the demo model: a jam's first fold-in of each size waited ~1.6 ms, p95 1.6 -> 3.0 ms), so its
rows are padded to a multiple of `ROW_BUCKET` and `LeanLlama` builds the buckets' primitives at load.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

GEMMS = ("auto", "mkl", "onednn")  # who multiplies a float32 CPU prefill's projections; auto: see cpu_gemm
# Linux; elsewhere the vendor is unknown and torch's own matmul (MKL) is kept. Read here, not through
# pipeline/core/device.py (which reads the flags): the runner imports no pipeline code
CPUINFO = Path("/proc/cpuinfo")
ROW_BUCKET = 16  # oneDNN's rows are padded to a multiple of this (see the module docstring)
WARM_ROWS_MAX = 1024  # buckets built at load up to this many rows (64 x 5 primitives); longer prefills build theirs


def cpu_gemm(choice: str = "auto") -> str:
    """The library for float32 CPU projections: `choice`, or for "auto" oneDNN on a CPU that is not Intel's, MKL on
    Intel's (and where the vendor is unknown).

    torch's float32 matmul is MKL's, whose AVX-512 kernels run on Intel CPUs only: on an AMD EPYC (Zen 5, AVX-512)
    one thread multiplied the demo model's 128-id projections at ~105 GFLOP/s through it and ~230 through oneDNN's
    inner product (torch's `mkldnn::_linear_pointwise`, which dispatches on the instruction set), the same sums to
    1e-4. On Intel MKL is the path measured fast, so it stays there.
    """
    if choice not in GEMMS:
        raise ValueError(f"gemm {choice!r}: expected one of {GEMMS}")
    if choice != "auto":
        return choice
    try:
        vendor = next((line for line in CPUINFO.read_text().splitlines() if line.startswith("vendor_id")), "")
    except OSError:
        vendor = ""
    other = vendor and "GenuineIntel" not in vendor
    return "onednn" if other and torch.backends.mkldnn.is_available() else "mkl"


class Dense:
    """x @ W.T with W stored transposed (in, out), the layout mm and addmm read fastest; with `onednn`, oneDNN's
    inner product over the same memory for 2 rows or more (it reads the (out, in) view without a copy; one row took
    it 15 us against MKL's 6 at 192 x 576)."""

    def __init__(self, weight: torch.Tensor, onednn: bool = False):
        self.t = weight.T.contiguous()
        self.onednn = onednn

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self._onednn(x) if self.onednn and len(x) > 1 else torch.mm(x, self.t)

    def add(self, residual: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self._onednn(x).add_(residual) if self.onednn and len(x) > 1 else torch.addmm(residual, x, self.t)

    def build_buckets(self, max_rows: int) -> None:
        """Run once per row bucket up to `max_rows` (at most `WARM_ROWS_MAX`), so that oneDNN's primitives exist
        before they are needed (~30 ms for the demo model's 5 shapes x 16 buckets; they live in oneDNN's
        process-wide cache, 1,024 primitives by default)."""
        last = min(max_rows, WARM_ROWS_MAX)
        with torch.inference_mode():
            for rows in range(ROW_BUCKET, last + ROW_BUCKET, ROW_BUCKET):
                self(torch.zeros(rows, self.t.shape[0], dtype=self.t.dtype))

    def _onednn(self, x: torch.Tensor) -> torch.Tensor:
        n = len(x)
        rows = -(-n // ROW_BUCKET) * ROW_BUCKET
        if rows != n:  # zero rows to the bucket's count (see ROW_BUCKET); rows are independent sums
            x = torch.cat((x, x.new_zeros(rows - n, x.shape[1])))
        return torch.ops.mkldnn._linear_pointwise(x, self.t.T, None, "none", [], "")[:n]


class Int8:
    """fbgemm's dynamic int8 linear: weights per output channel, activations per call."""

    def __init__(self, weight: torch.Tensor):
        w = weight.float()
        scale = (w.abs().amax(dim=1) / 127.0).clamp_min(1e-12).double()
        zero = torch.zeros(w.shape[0], dtype=torch.long)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch deprecates quantized tensors in favour of torchao
            q = torch.quantize_per_channel(w, scale, zero, 0, torch.qint8)
            self.packed = torch.ops.quantized.linear_prepack(q, None)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.quantized.linear_dynamic(x, self.packed, True)

    def add(self, residual: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self(x).add_(residual)
