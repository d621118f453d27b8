"""Counter-based random projection matrices P ∈ R^{p×k} (MATH.md §9).

Entry P[i, j] depends only on (seed, row_offset + i, j), so any block of rows can be generated
independently, on any backend, and the projection of a model's flattened gradient equals the
sum of its layers' projections with each layer's parameter offset as ``row_offset``.
"""
from __future__ import annotations

import math

import torch

from .._dispatch import cuda_stream, op
from .._ext import _C
from .._validate import FLOAT_DTYPES, check_choice, check_int, check_seed
from .philox import _philox4x32_reference

KINDS = ("rademacher", "gaussian")
_KIND_CODE = {"rademacher": 0, "gaussian": 1}  # fimoda::ProjectionKind
_MAX_INDEX = 2**63  # parameter indices are int64 everywhere (torch, Triton)
_CAST_CHUNK_BYTES = 64 * 2**20  # fp32 staging block for fp16/bf16 outputs

_OP = op("projection_matrix")


def check_row_offset(row_offset, p: int) -> int:
    """row_offset as an int with row_offset + p <= 2^63 (parameter indices are int64)."""
    row_offset = check_int("row_offset", row_offset, min_value=0)
    if row_offset > _MAX_INDEX - p:
        raise ValueError(f"row_offset: expected row_offset + p <= 2^63 (64-bit parameter indices; p = {p} rows), "
                         f"got {row_offset}")
    return row_offset


def _projection_matrix_reference(p: int, k: int, seed: int, kind: str = "rademacher", row_offset: int = 0,
                                 dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
    """Pure-torch P: vectorized int64 Philox, Box–Muller in float64, then cast to ``dtype``.
    Rows are generated in blocks to bound the int64 temporaries (~32 bytes per Philox word)."""
    device = torch.device("cpu") if device is None else torch.device(device)
    per_call = 4 if kind == "rademacher" else 2
    groups = -(-k // per_call)
    scale = 1.0 / math.sqrt(k)
    out = torch.empty(p, k, dtype=dtype, device=device)
    rows_per_block = max(1, (2**22) // max(1, groups))
    key = torch.tensor([seed & 0xFFFFFFFF, seed >> 32], dtype=torch.int64, device=device)
    g = torch.arange(groups, dtype=torch.int64, device=device)
    for r0 in range(0, p, rows_per_block):
        idx = row_offset + torch.arange(r0, min(p, r0 + rows_per_block), dtype=torch.int64, device=device)
        counter = torch.stack(torch.broadcast_tensors(
            g[None, :], (idx & 0xFFFFFFFF)[:, None], (idx >> 32)[:, None],
            torch.full((1, 1), 0 if kind == "rademacher" else 1, dtype=torch.int64, device=device)), -1)
        w = _philox4x32_reference(counter, key).to(torch.float64)  # [rows, groups, 4]
        if kind == "rademacher":
            vals = (1.0 - 2.0 * torch.remainder(w, 2)) * scale
        else:
            u1 = (w[..., 0::2] + 1.0) * 2.0**-32
            u2 = w[..., 1::2] * 2.0**-32
            vals = torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(2.0 * math.pi * u2) * scale
        out[r0:r0 + idx.numel()] = vals.reshape(idx.numel(), -1)[:, :k].to(dtype)
    return out


def projection_matrix(p: int, k: int, seed: int, kind: str = "rademacher", row_offset: int = 0,
                      dtype: torch.dtype = torch.float32, device=None,
                      backend: str | None = None) -> torch.Tensor:
    """The projection matrix P[row_offset : row_offset + p, :k] of MATH.md §9.

    Args:
        p: number of rows (parameters), >= 0. k: number of columns (projection dim), >= 1.
        seed: integer in [0, 2^64); the Philox key is (seed mod 2^32, seed >> 32).
        kind: "rademacher" (±1/√k; bit-identical on every backend) or "gaussian" (N(0, 1/k) by
            Box–Muller; float32 math for float32/16 outputs, float64 for float64; backends agree
            to ~1e-6 relative).
        row_offset: global parameter index of the first row (64-bit; row_offset + p <= 2^63).
        dtype: float32, float64, float16 or bfloat16. Kernels compute float32 (float64 for a
            float64 result); half outputs are staged through float32 blocks of 64 MiB.
        device: output device (default CPU). backend: "cuda", "triton", "cpu", "torch" or None.

    Returns:
        Tensor [p, k] of ``dtype`` on ``device``. All backends write each entry once; the cpu
        kernel is OpenMP over rows with AVX2/AVX-512 Philox lanes, cuda/triton one thread per
        Philox call.
    """
    p = check_int("p", p, min_value=0)
    k = check_int("k", k, min_value=1, max_value=2**32 - 1)
    seed = check_seed("seed", seed)
    kind = check_choice("kind", kind, KINDS)
    row_offset = check_row_offset(row_offset, p)
    if not isinstance(dtype, torch.dtype) or dtype not in FLOAT_DTYPES:
        raise TypeError(f"dtype: expected one of {[str(d) for d in FLOAT_DTYPES]}, got {dtype!r}")
    device = torch.device("cpu") if device is None else torch.device(device)
    impl = _OP.select(backend, device, dtype)
    out = torch.empty(p, k, dtype=dtype, device=device)
    if dtype in (torch.float32, torch.float64) or impl.backend == "torch":
        impl.fn(out, seed, kind, row_offset)
        return out
    block = max(1, _CAST_CHUNK_BYTES // (4 * k))
    part = torch.empty(min(block, p), k, dtype=torch.float32, device=device)  # reused staging block
    for r0 in range(0, p, block):
        rows = min(block, p - r0)
        impl.fn(part[:rows], seed, kind, row_offset + r0)
        out[r0:r0 + rows] = part[:rows]
    return out


@_OP.register("torch")
def _projection_torch(out, seed, kind, row_offset):
    rows, k = out.shape
    out.copy_(_projection_matrix_reference(rows, k, seed, kind, row_offset, out.dtype, out.device))


@_OP.register("cpu")
def _projection_cpu(out, seed, kind, row_offset, col_begin: int = 0, k: int | None = None):
    """Columns [col_begin, col_begin + cols) of P's rows into the contiguous ``out [rows, cols]``; ``k``
    (default cols) is the width of the whole P, which sets the scale 1/√k (col_begin + cols <= k)."""
    rows, cols = out.shape
    k = cols if k is None else k
    _C.projection_matrix_cpu(out.data_ptr(), out.dtype == torch.float64, rows, col_begin, cols, seed,
                             _KIND_CODE[kind], row_offset, 1.0 / math.sqrt(k))


@_OP.register("cuda")
def _projection_cuda(out, seed, kind, row_offset):
    rows, k = out.shape
    _C.projection_matrix_cuda(out.data_ptr(), out.dtype == torch.float64, rows, k, seed, _KIND_CODE[kind],
                              row_offset, 1.0 / math.sqrt(k), cuda_stream(out.device))


@_OP.register("triton")
def _projection_triton(out, seed, kind, row_offset):
    from ..triton.projection_matrix import projection_matrix as kernel

    kernel(out, seed, _KIND_CODE[kind], row_offset, 1.0 / math.sqrt(out.shape[1]))
