"""Philox4x32-10 (MATH.md §9) as an op: the counter-based RNG every projection is built from."""
from __future__ import annotations

import torch

from .._dispatch import cuda_stream, op
from .._ext import _C
from .._validate import check_input

_MASK32 = 0xFFFFFFFF
_M0, _M1 = 0xD2511F53, 0xCD9E8D57
_W0, _W1 = 0x9E3779B9, 0xBB67AE85

_OP = op("philox4x32")


def _mulhilo32(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(hi, lo) 32-bit words of a·b for a constant a < 2^32 and int64 b < 2^32 without overflow:
    split a into 16-bit halves so every partial product stays below 2^48."""
    t_lo = b * (a & 0xFFFF)
    t_hi = b * (a >> 16)
    mid = t_lo + ((t_hi & 0xFFFF) << 16)
    return (t_hi >> 16) + (mid >> 32), mid & _MASK32


def _philox4x32_reference(counter: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """Vectorized int64 Philox: counter [..., 4], key [..., 2] (uint32 words) -> [..., 4]."""
    c0, c1, c2, c3 = counter.to(torch.int64).unbind(-1)
    k0, k1 = key.to(torch.int64).unbind(-1)
    for _ in range(10):
        hi0, lo0 = _mulhilo32(_M0, c0)
        hi1, lo1 = _mulhilo32(_M1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0 = (k0 + _W0) & _MASK32
        k1 = (k1 + _W1) & _MASK32
    return torch.stack([c0, c1, c2, c3], dim=-1)


def philox4x32(counter: torch.Tensor, key: torch.Tensor, backend: str | None = None) -> torch.Tensor:
    """Philox4x32-10 of MATH.md §9 on every counter.

    Args:
        counter: int64 tensor [..., 4] of uint32 words (each in [0, 2^32)).
        key: int64 tensor [..., 2] of uint32 words; leading dims broadcast with ``counter``'s.
        backend: "cuda", "triton", "cpu", "torch" or None (see ``fimoda_kernels.info``).

    Returns:
        int64 tensor [broadcast(...), 4] of output words in [0, 2^32).
    """
    check_input("counter", counter, dtypes=(torch.int64,))
    check_input("key", key, dtypes=(torch.int64,), device=counter.device)
    if counter.dim() < 1 or counter.shape[-1] != 4:
        raise ValueError(f"counter: expected shape [..., 4], got {tuple(counter.shape)}")
    if key.dim() < 1 or key.shape[-1] != 2:
        raise ValueError(f"key: expected shape [..., 2], got {tuple(key.shape)}")
    for name, t in (("counter", counter), ("key", key)):
        if t.numel() and (int(t.min()) < 0 or int(t.max()) > _MASK32):
            raise ValueError(f"{name}: expected uint32 words in [0, 2^32), got values in "
                             f"[{int(t.min())}, {int(t.max())}]")
    try:
        lead = torch.broadcast_shapes(counter.shape[:-1], key.shape[:-1])
    except RuntimeError:
        raise ValueError(f"counter {tuple(counter.shape)} and key {tuple(key.shape)}: leading "
                         "dimensions do not broadcast") from None
    counter = counter.expand(*lead, 4).reshape(-1, 4).contiguous()
    key = key.expand(*lead, 2).reshape(-1, 2).contiguous()
    impl = _OP.select(backend, counter.device, counter, key)
    return impl.fn(counter, key).reshape(*lead, 4)


@_OP.register("torch")
def _philox_torch(counter, key):
    return _philox4x32_reference(counter, key)


@_OP.register("cpu")
def _philox_cpu(counter, key):
    out = torch.empty_like(counter)
    _C.philox4x32_cpu(counter.data_ptr(), key.data_ptr(), out.data_ptr(), counter.shape[0])
    return out


@_OP.register("cuda")
def _philox_cuda(counter, key):
    out = torch.empty_like(counter)
    _C.philox4x32_cuda(counter.data_ptr(), key.data_ptr(), out.data_ptr(), counter.shape[0],
                       cuda_stream(counter.device))
    return out


@_OP.register("triton")
def _philox_triton(counter, key):
    from ..triton.philox import philox4x32 as kernel

    out = torch.empty_like(counter)
    kernel(counter, key, out)
    return out
