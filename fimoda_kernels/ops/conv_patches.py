"""Conv2d input patches in the layout of the factored kernels (MATH.md §4, Conv2d through unfold).

``conv_patches(x, ...)`` returns ``a [N, Ho·Wo, C·kh·kw (+1)]``: row t of sample n holds the receptive
field of output position t in torch's unfold order (channel, kernel row, kernel column), then a 1 for
the bias when ``bias``. It is what :class:`fimoda_kernels.grads.LinearCapture` records for every
Conv2d, so Conv2d layers behave as Linear layers with T = Ho·Wo positions.

Backends: torch (the reference: ``F.unfold``, a transposing copy, then the bias column
concatenated — three passes over the largest activation tensor of a CNN) and cpu
(csrc/cpu/conv_patches.cpp: one OpenMP pass writing each output row contiguously). On the GPU the
torch path is used (torch's unfold kernel is memory-bound there too).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .._dispatch import op
from .._validate import FLOAT_DTYPES, check_input

_OP = op("conv_patches")
_DTYPES = (torch.float32, torch.float64)


def _pair(name: str, value) -> tuple[int, int]:
    pair = (value, value) if isinstance(value, int) else tuple(value) if isinstance(value, (tuple, list)) else ()
    if len(pair) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in pair):
        raise TypeError(f"{name}: expected an int or a pair of ints, got {value!r}")
    return pair


def output_size(size: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def _conv_patches_reference(x, kernel_size, stride, padding, dilation, bias):
    if x.shape[1] == 0:  # no channels: no patch entries (unfold refuses an empty input)
        L = math.prod(output_size(x.shape[2 + i], kernel_size[i], stride[i], padding[i], dilation[i]) for i in range(2))
        a = x.new_zeros(x.shape[0], L, 0)
    else:
        a = F.unfold(x, kernel_size, dilation, padding, stride).transpose(1, 2)
    return torch.cat([a, a.new_ones(a.shape[:-1] + (1,))], -1) if bias else a.contiguous()


def conv_patches(x: torch.Tensor, kernel_size, stride=1, padding=0, dilation=1, bias: bool = True,
                 backend: str | None = None) -> torch.Tensor:
    """Patches ``[N, Ho·Wo, C·kh·kw + bias]`` (contiguous, x's dtype) of ``x [N, C, H, W]`` for a
    Conv2d with these ``kernel_size``, ``stride``, symmetric ``padding`` and ``dilation`` (ints or
    pairs; groups = 1). backend: "cpu" (float32/float64 CPU tensors), "torch" or None."""
    check_input("x", x, ndim=4, dtypes=FLOAT_DTYPES)
    k, s, p, d = (_pair(n, v) for n, v in (("kernel_size", kernel_size), ("stride", stride),
                                           ("padding", padding), ("dilation", dilation)))
    if min(k) < 1 or min(s) < 1 or min(d) < 1 or min(p) < 0:
        raise ValueError(f"kernel_size, stride, dilation: expected >= 1 and padding >= 0, got "
                         f"kernel_size={k}, stride={s}, padding={p}, dilation={d}")
    Ho, Wo = (output_size(x.shape[2 + i], k[i], s[i], p[i], d[i]) for i in range(2))
    if Ho < 1 or Wo < 1:
        raise ValueError(f"x: a {tuple(x.shape[2:])} image with kernel_size={k}, padding={p}, dilation={d} "
                         f"has no output position")
    if not isinstance(bias, bool):
        raise TypeError(f"bias: expected a bool, got {type(bias).__name__}")
    impl = _OP.select(backend, x.device, x)
    return impl.fn(x, k, s, p, d, bias, Ho, Wo)


def patches_backend(x: torch.Tensor) -> str:
    """The backend the capture uses for x (see ``Op.cpu_or_torch``)."""
    return _OP.cpu_or_torch(x)


@_OP.register("torch")
def _conv_patches_torch(x, k, s, p, d, bias, Ho, Wo):
    return _conv_patches_reference(x, k, s, p, d, bias)


def _cpu_unsupported(x, *args, **kwargs) -> list[str]:
    return [] if x.dtype in _DTYPES else [f"x: cpu takes float32 or float64, got {x.dtype}"]


@_OP.register("cpu", _cpu_unsupported)
def _conv_patches_cpu(x, k, s, p, d, bias, Ho, Wo):
    from .._ext import _C

    N, C, H, W = x.shape
    out = torch.empty(N, Ho * Wo, C * k[0] * k[1] + bias, dtype=x.dtype, device=x.device)
    if out.numel():  # x read through its strides: channels_last (or any view) needs no copy
        _C.conv_patches_cpu(x.data_ptr(), list(x.stride()), out.data_ptr(), x.dtype == torch.float64, N, C, H, W,
                            k[0], k[1], s[0], s[1], p[0], p[1], d[0], d[1], Ho, Wo, bias)
    return out
