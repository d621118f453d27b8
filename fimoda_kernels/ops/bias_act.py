"""Bias + activation epilogues of M stacked Linear layers (the fused further-training MLP, MATH.md §2).

``bias_act(z, bias, act)`` turns the pre-activations ``z [M, R, C]`` of M models' batched GEMM (no bias)
into their activations in place: ``z ← act(z + bias[:, None, :])``. ``bias_act_backward(g, h, act,
bias_grad)`` turns a gradient with respect to the activations ``h`` into one with respect to the
pre-activations in place, ``g ← g · act'(z)`` with act' written in terms of h (so z need not be kept),
and writes the bias gradient ``bias_grad[m] = Σ_r g[m, r]``.

Activations: "identity", "relu", "leaky_relu" (``slope`` ≥ 0), and for the backward also "tanh" and
"sigmoid" (their derivatives 1 − h², h(1 − h) are polynomials in h; their forward needs exp, which
torch's vectorized math does better, so ``bias_act`` takes only the piecewise-linear ones).

Backends: torch (the reference: the bias broadcast, the activation and the column sum as separate
passes, as the unfused engine did) and cpu (csrc/cpu/bias_act.cpp: one OpenMP pass each, the bias sum
per model over rows in order, so it does not depend on the thread count). On the GPU the torch path is
used.
"""
from __future__ import annotations

import torch

from .._dispatch import op
from .._validate import check_choice, check_float, check_tensor

_FWD, _BWD = op("bias_act"), op("bias_act_backward")
_DTYPES = (torch.float32, torch.float64)
ACT_CODES = {"identity": 0, "relu": 1, "leaky_relu": 2, "tanh": 3, "sigmoid": 4}
FORWARD_ACTS = ("identity", "relu", "leaky_relu")


def _bias_act_reference(z: torch.Tensor, bias: torch.Tensor | None, act: str, slope: float) -> torch.Tensor:
    if bias is not None:
        z.add_(bias[:, None, :])
    if act == "relu":
        z.clamp_(min=0)
    elif act == "leaky_relu":
        torch.where(z > 0, z, z * slope, out=z)
    return z


def _bias_act_backward_reference(g, h, bias_grad, act: str, slope: float) -> torch.Tensor:
    if act == "relu":
        g.mul_(h > 0)
    elif act == "leaky_relu":
        torch.where(h > 0, g, g * slope, out=g)
    elif act == "tanh":
        g.mul_(1 - h * h)
    elif act == "sigmoid":
        g.mul_(h * (1 - h))
    if bias_grad is not None:
        torch.sum(g, 1, out=bias_grad)
    return g


def _check(name: str, t: torch.Tensor, like: torch.Tensor | None, shape) -> None:
    check_tensor(name, t, ndim=len(shape), dtypes=_DTYPES if like is None else (like.dtype,),
                 device=None if like is None else like.device)
    if tuple(t.shape) != tuple(shape) or not t.is_contiguous():
        raise ValueError(f"{name}: expected a contiguous tensor of shape {tuple(shape)}, got shape "
                         f"{tuple(t.shape)}{'' if t.is_contiguous() else ' (not contiguous)'}")


def bias_act(z: torch.Tensor, bias: torch.Tensor | None = None, act: str = "relu", slope: float = 0.01,
             backend: str | None = None) -> torch.Tensor:
    """``z ← act(z + bias[:, None, :])`` in place and returned.

    Args:
        z: contiguous ``[M, R, C]`` float32/float64 pre-activations (M models, R rows, C features).
        bias: ``[M, C]`` of z's dtype and device, or None.
        act: "identity", "relu" or "leaky_relu"; slope: leaky_relu's negative slope (≥ 0).
        backend: "cpu", "torch" or None.
    """
    _check("z", z, None, z.shape if z.dim() == 3 else (0, 0, 0))
    if bias is not None:
        _check("bias", bias, z, (z.shape[0], z.shape[2]))
    act = check_choice("act", act, FORWARD_ACTS)
    slope = check_float("slope", slope, min_value=0.0)
    impl = _FWD.select(backend, z.device, z)
    impl.fn(z, bias, act, slope)
    return z


def bias_act_backward(g: torch.Tensor, h: torch.Tensor, act: str = "relu", bias_grad: torch.Tensor | None = None,
                      slope: float = 0.01, backend: str | None = None) -> torch.Tensor:
    """``g ← g · act'(z)`` in place (act' from the activations ``h = act(z)``) and, when given,
    ``bias_grad[m] = Σ_r g[m, r]`` of the new g. Returns g.

    Args:
        g, h: contiguous ``[M, R, C]`` float32/float64, one dtype and device.
        act: "identity", "relu", "leaky_relu", "tanh" or "sigmoid"; slope: leaky_relu's (≥ 0).
        bias_grad: contiguous ``[M, C]`` output, or None.
        backend: "cpu", "torch" or None.
    """
    _check("g", g, None, g.shape if g.dim() == 3 else (0, 0, 0))
    _check("h", h, g, g.shape)
    if bias_grad is not None:
        _check("bias_grad", bias_grad, g, (g.shape[0], g.shape[2]))
    act = check_choice("act", act, tuple(ACT_CODES))
    slope = check_float("slope", slope, min_value=0.0)
    impl = _BWD.select(backend, g.device, g)
    impl.fn(g, h, bias_grad, act, slope)
    return g


def epilogue_backend(x: torch.Tensor) -> str:
    """"cpu" where the native passes take x (built module, CPU tensor, float32/float64), else "torch";
    for callers that select once and then call ``_FWD.impls[...]`` / ``_BWD.impls[...]`` per step."""
    return "torch" if _FWD.reasons("cpu", x.device, x) else "cpu"


def _cpu_unsupported(x, *args, **kwargs) -> list[str]:
    return [] if x.dtype in _DTYPES else [f"cpu takes float32 or float64, got {x.dtype}"]


@_FWD.register("torch")
def _bias_act_torch(z, bias, act, slope):
    _bias_act_reference(z, bias, act, slope)


@_BWD.register("torch")
def _bias_act_backward_torch(g, h, bias_grad, act, slope):
    _bias_act_backward_reference(g, h, bias_grad, act, slope)


@_FWD.register("cpu", _cpu_unsupported)
def _bias_act_cpu(z, bias, act, slope):
    from .._ext import _C

    M, R, C = z.shape
    if z.numel():
        _C.bias_act_cpu(z.data_ptr(), 0 if bias is None else bias.data_ptr(), z.dtype == torch.float64, M, R, C,
                        ACT_CODES[act], slope)


@_BWD.register("cpu", _cpu_unsupported)
def _bias_act_backward_cpu(g, h, bias_grad, act, slope):
    from .._ext import _C

    M, R, C = g.shape
    if bias_grad is not None and R == 0:
        bias_grad.zero_()
    if g.numel():
        _C.bias_act_backward_cpu(g.data_ptr(), h.data_ptr(), 0 if bias_grad is None else bias_grad.data_ptr(),
                                 g.dtype == torch.float64, M, R, C, ACT_CODES[act], slope)
