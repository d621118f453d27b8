"""The fused LiSSA update (MATH.md §5): ``h ← v + (1 − d)·h − (M h) / s`` for a block of r vectors,
returning the new block and the squared norm of each of its rows, so the solver's divergence check
reads no extra pass over [r, p].
"""
from __future__ import annotations

import torch

from .._dispatch import op
from .._validate import bump_version, check_disjoint, check_float, check_input, memory_overlaps

_LISSA_UPDATE = op("lissa_update")
_DTYPES = (torch.float32, torch.float64)
_DTYPE_CODE = {torch.float32: 0, torch.float64: 3}


def _lissa_update_reference(h: torch.Tensor, v: torch.Tensor, mh: torch.Tensor, scale: float, damping: float
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 ``(v + (1 − damping)·h − mh / scale, ‖·‖² per row)``."""
    out = v.double() + (1.0 - damping) * h.double() - mh.double() / scale
    return out, (out * out).sum(1)


def lissa_update(h: torch.Tensor, v: torch.Tensor, mh: torch.Tensor, scale: float, damping: float,
                 out: torch.Tensor | None = None, backend: str | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """One LiSSA step for r vectors at once: ``out = v + (1 − damping)·h − mh / scale``.

    Args:
        h, v, mh: ``[r, p]`` float32 or float64, one dtype and device: the current iterate, the
            right-hand sides and the (minibatch) Hessian–iterate product ``M h``.
        scale: s > 0; damping: d ≥ 0 (fixed point h/s = (M + d·s·I)^{-1} v).
        out: optional contiguous ``[r, p]`` destination; it may be ``h`` itself (in-place update).
        backend: "cuda", "triton", "cpu", "torch" or None.

    Returns ``(out, sq_norms)``: the new iterate (out's dtype) and ``sq_norms [r]`` = ‖out_i‖², float64
    for float64 inputs, else float32 (cpu: accumulated in float64; triton/cuda: in the element type).
    Non-finite values are passed through (the solver decides what they mean).

    cpu: one OpenMP pass (csrc/cpu/lissa_update.cpp), three reads and one write per element, the norm
    from the values in registers; torch would need four passes (two temporaries) plus one for the norm.
    """
    check_input("h", h, ndim=2, dtypes=_DTYPES)
    check_input("v", v, ndim=2, dtypes=(h.dtype,), device=h.device)
    check_input("mh", mh, ndim=2, dtypes=(h.dtype,), device=h.device)
    for name, t in (("v", v), ("mh", mh)):
        if t.shape != h.shape:
            raise ValueError(f"{name}: expected shape {tuple(h.shape)} (as h), got {tuple(t.shape)}")
    scale = check_float("scale", scale, positive=True)
    info = torch.finfo(h.dtype)
    if not info.tiny <= 1.0 / scale <= info.max:  # the kernels multiply by 1/scale in h's dtype
        raise ValueError(f"scale: expected a value whose reciprocal is a normal {h.dtype} number "
                         f"(in [{1 / info.max:.3g}, {1 / info.tiny:.3g}]), got {scale}")
    damping = check_float("damping", damping, min_value=0.0)
    if out is None:
        out = torch.empty_like(h, memory_format=torch.contiguous_format)
    else:
        check_input("out", out, ndim=2, dtypes=(h.dtype,), device=h.device)
        if out.shape != h.shape or not out.is_contiguous():
            raise ValueError(f"out: expected a contiguous tensor of shape {tuple(h.shape)}, got shape "
                             f"{tuple(out.shape)}{'' if out.is_contiguous() else ' (not contiguous)'}")
        check_disjoint("out", out, v=v, mh=mh)
        if memory_overlaps(out, h) and (out.data_ptr() != h.data_ptr() or out.stride() != h.stride()):
            raise ValueError("out: expected h itself (in place) or memory separate from h's, got a partial overlap")
    impl = _LISSA_UPDATE.select(backend, h.device, h)
    h, v, mh = h.contiguous(), v.contiguous(), mh.contiguous()
    sq = impl.fn(h, v, mh, out, scale, damping)
    bump_version(out)
    return out, sq


def _norm_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


@_LISSA_UPDATE.register("torch")
def _lissa_update_torch(h, v, mh, out, scale, damping):
    new, sq = _lissa_update_reference(h, v, mh, scale, damping)
    out.copy_(new)
    return sq.to(_norm_dtype(h.dtype))


@_LISSA_UPDATE.register("cpu")
def _lissa_update_cpu(h, v, mh, out, scale, damping):
    from .._ext import _C

    sq = torch.empty(h.shape[0], dtype=torch.float64)
    _C.lissa_update_cpu(h.data_ptr(), v.data_ptr(), mh.data_ptr(), out.data_ptr(), sq.data_ptr(),
                        h.dtype == torch.float64, h.shape[0], h.shape[1], scale, damping)
    return sq.to(_norm_dtype(h.dtype))


@_LISSA_UPDATE.register("triton")
def _lissa_update_triton(h, v, mh, out, scale, damping):
    from ..triton.lissa_update import lissa_update as kernel

    return kernel(h, v, mh, out, scale, damping)


@_LISSA_UPDATE.register("cuda")
def _lissa_update_cuda(h, v, mh, out, scale, damping):
    from .._dispatch import cuda_stream
    from .._ext import _C

    r, p = h.shape
    sq = torch.empty(r, dtype=h.dtype, device=h.device)
    partials = torch.empty(max(1, _C.lissa_update_cuda_partials(r, p)), dtype=h.dtype, device=h.device)
    _C.lissa_update_cuda(h.data_ptr(), v.data_ptr(), mh.data_ptr(), out.data_ptr(), sq.data_ptr(),
                         partials.data_ptr(), _DTYPE_CODE[h.dtype], r, p, scale, damping, cuda_stream(h.device))
    return sq
