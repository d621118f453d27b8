"""Bias + activation epilogues of M stacked Linear layers (the fused further-training MLP, MATH.md §2).

``bias_act(z, bias, act)`` turns the pre-activations ``z [M, R, C]`` of M models' batched GEMM (no bias)
into their activations in place: ``z ← act(z + bias[:, None, :])``. ``bias_act_backward(g, h, act,
bias_grad)`` turns a gradient with respect to the activations ``h`` into one with respect to the
pre-activations in place, ``g ← g · act'(z)`` with act' written in terms of h (so z need not be kept),
and writes the bias gradient ``bias_grad[m] = Σ_r g[m, r]``.

A one-output layer after this one (regression heads: ``W_out [M, 1, C]``) folds in as well, since its
work is one dot product per row: the forward also writes ``out[m, r] = Σ_c h[m, r, c]·W_out[m, c]``
(``out_weight``, ``out``); the backward takes that layer's output gradient ``u = out_grad [M, R]``,
forms g = u ⊗ W_out itself (g is then written only) and writes the layer's weight gradient
``out_weight_grad[m] = Σ_r u[m, r]·h[m, r]``. Otherwise these are a batched GEMM with one column
(0.3 ms for 64 Energy models, as long as this whole pass), an outer product and another GEMM.

Activations: "identity", "relu", "leaky_relu" (``slope`` ≥ 0), and for the backward also "tanh" and
"sigmoid" (their derivatives 1 − h², h(1 − h) are polynomials in h; their forward needs exp, which
torch's vectorized math does better, so ``bias_act`` takes only the piecewise-linear ones).

Non-finite values propagate as in torch's own ops (NaN in, NaN out; act' at a NaN h as aten's
``*_backward``): these are passes inside a training step, whose caller checks its losses.

Backends: torch (the reference: separate passes and GEMMs, as the unfused engine did) and cpu
(csrc/cpu/bias_act.cpp: one OpenMP pass each, compiled for AVX-512 / AVX2 / baseline; the sums per
model over rows in order, so they depend neither on the thread count nor on M; the one-output dot
product's order follows the SIMD width, so its bits may differ between instruction sets). Further
training uses them on the CPU only: on a GPU, baddbmm's bias and aten's one-pass backward do better
than the torch reference's separate passes.
"""
from __future__ import annotations

import torch

from .._dispatch import op
from .._validate import check_choice, check_disjoint, check_float, check_input

_FWD, _BWD = op("bias_act"), op("bias_act_backward")
_DTYPES = (torch.float32, torch.float64)
ACT_CODES = {"identity": 0, "relu": 1, "leaky_relu": 2, "tanh": 3, "sigmoid": 4}
FORWARD_ACTS = ("identity", "relu", "leaky_relu")


def _bias_act_reference(z: torch.Tensor, bias: torch.Tensor | None, act: str, slope: float,
                        out_weight: torch.Tensor | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    if bias is not None:
        z.add_(bias[:, None, :])
    if act == "relu":
        z.clamp_(min=0)
    elif act == "leaky_relu":
        torch.where(z > 0, z, z * slope, out=z)
    if out_weight is not None:
        torch.bmm(z, out_weight[:, :, None], out=out[:, :, None])
    return z


def _bias_act_backward_reference(g, h, bias_grad, act: str, slope: float, out_grad=None, out_weight=None,
                                 out_weight_grad=None) -> torch.Tensor:
    if out_grad is not None:
        torch.mul(out_grad[:, :, None], out_weight[:, None, :], out=g)
        torch.bmm(out_grad[:, None, :], h, out=out_weight_grad[:, None, :])
    if act == "relu":
        g.masked_fill_(h <= 0, 0)  # as aten's threshold_backward: a NaN h passes g
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
    check_input(name, t, ndim=len(shape), dtypes=_DTYPES if like is None else (like.dtype,),
                 device=None if like is None else like.device)
    if tuple(t.shape) != tuple(shape) or not t.is_contiguous():
        raise ValueError(f"{name}: expected a contiguous tensor of shape {tuple(shape)}, got shape "
                         f"{tuple(t.shape)}{'' if t.is_contiguous() else ' (not contiguous)'}")


def bias_act(z: torch.Tensor, bias: torch.Tensor | None = None, act: str = "relu", slope: float = 0.01,
             out_weight: torch.Tensor | None = None, out: torch.Tensor | None = None,
             backend: str | None = None) -> torch.Tensor:
    """``z ← act(z + bias[:, None, :])`` in place and returned; with ``out_weight`` also
    ``out[m, r] = Σ_c z[m, r, c]·out_weight[m, c]`` (a following one-output layer, before its bias).

    Args:
        z: contiguous ``[M, R, C]`` float32/float64 pre-activations (M models, R rows, C features).
        bias: ``[M, C]`` of z's dtype and device, or None.
        act: "identity", "relu" or "leaky_relu"; slope: leaky_relu's negative slope (≥ 0).
        out_weight, out: ``[M, C]`` and ``[M, R]`` (contiguous, z's dtype and device), both or neither.
        backend: "cpu", "torch" or None.
    """
    _check("z", z, None, z.shape if z.dim() == 3 else (0, 0, 0))
    M, R, C = z.shape
    if bias is not None:
        _check("bias", bias, z, (M, C))
    if (out_weight is None) != (out is None):
        raise ValueError("out_weight, out: expected both or neither, got "
                         f"{'out_weight' if out is None else 'out'} alone")
    if out is not None:
        _check("out_weight", out_weight, z, (M, C))
        _check("out", out, z, (M, R))
    check_disjoint("z", z, bias=bias, out_weight=out_weight)
    check_disjoint("out", out, z=z, bias=bias, out_weight=out_weight)
    act = check_choice("act", act, FORWARD_ACTS)
    slope = check_float("slope", slope, min_value=0.0)
    impl = _FWD.select(backend, z.device, z)
    impl.fn(z, bias, act, slope, out_weight, out)
    return z


def bias_act_backward(g: torch.Tensor, h: torch.Tensor, act: str = "relu", bias_grad: torch.Tensor | None = None,
                      slope: float = 0.01, out_grad: torch.Tensor | None = None,
                      out_weight: torch.Tensor | None = None, out_weight_grad: torch.Tensor | None = None,
                      backend: str | None = None) -> torch.Tensor:
    """``g ← g · act'(z)`` in place (act' from the activations ``h = act(z)``) and, when given,
    ``bias_grad[m] = Σ_r g[m, r]`` of the new g. Returns g.

    With ``out_grad`` (the output gradient of a following one-output layer whose weights are
    ``out_weight``), g's input is ``out_grad[m, r]·out_weight[m, c]`` (g is written only) and
    ``out_weight_grad[m, c] = Σ_r out_grad[m, r]·h[m, r, c]``.

    Args:
        g, h: contiguous ``[M, R, C]`` float32/float64, one dtype and device.
        act: "identity", "relu", "leaky_relu", "tanh" or "sigmoid"; slope: leaky_relu's (≥ 0).
        bias_grad: contiguous ``[M, C]`` output, or None.
        out_grad, out_weight, out_weight_grad: ``[M, R]``, ``[M, C]``, ``[M, C]`` (contiguous, g's dtype
            and device), all or none.
        backend: "cpu", "torch" or None.
    """
    _check("g", g, None, g.shape if g.dim() == 3 else (0, 0, 0))
    M, R, C = g.shape
    _check("h", h, g, (M, R, C))
    if bias_grad is not None:
        _check("bias_grad", bias_grad, g, (M, C))
    head = {"out_grad": out_grad, "out_weight": out_weight, "out_weight_grad": out_weight_grad}
    given = [k for k, v in head.items() if v is not None]
    if given and len(given) != 3:
        raise ValueError(f"out_grad, out_weight, out_weight_grad: expected all or none, got only {', '.join(given)}")
    if given:
        for name, shape in (("out_grad", (M, R)), ("out_weight", (M, C)), ("out_weight_grad", (M, C))):
            _check(name, head[name], g, shape)
        # g is written (from out_grad, out_weight) before h is read for out_weight_grad
        check_disjoint("g", g, h=h, out_grad=out_grad, out_weight=out_weight)
        check_disjoint("out_weight_grad", out_weight_grad, g=g, h=h, out_grad=out_grad, out_weight=out_weight)
    check_disjoint("bias_grad", bias_grad, g=g, h=h, out_grad=out_grad, out_weight=out_weight,
                   out_weight_grad=out_weight_grad)
    act = check_choice("act", act, tuple(ACT_CODES))
    slope = check_float("slope", slope, min_value=0.0)
    impl = _BWD.select(backend, g.device, g)
    impl.fn(g, h, bias_grad, act, slope, out_grad, out_weight, out_weight_grad)
    return g


def epilogue_backend(x: torch.Tensor) -> str:
    """The backend the further-training engine uses for x (see ``Op.cpu_or_torch``)."""
    return _FWD.cpu_or_torch(x)


def _cpu_unsupported(x, *args, **kwargs) -> list[str]:
    return [] if x.dtype in _DTYPES else [f"cpu takes float32 or float64, got {x.dtype}"]


@_FWD.register("torch")
def _bias_act_torch(z, bias, act, slope, out_weight=None, out=None):
    _bias_act_reference(z, bias, act, slope, out_weight, out)


@_BWD.register("torch")
def _bias_act_backward_torch(g, h, bias_grad, act, slope, out_grad=None, out_weight=None, out_weight_grad=None):
    _bias_act_backward_reference(g, h, bias_grad, act, slope, out_grad, out_weight, out_weight_grad)


def _ptr(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


@_FWD.register("cpu", _cpu_unsupported)
def _bias_act_cpu(z, bias, act, slope, out_weight=None, out=None):
    from .._ext import _C

    M, R, C = z.shape
    if z.numel():
        _C.bias_act_cpu(z.data_ptr(), _ptr(bias), _ptr(out_weight), _ptr(out), z.dtype == torch.float64, M, R, C,
                        ACT_CODES[act], slope)
    elif out is not None:
        out.zero_()  # C = 0: empty dot products


@_BWD.register("cpu", _cpu_unsupported)
def _bias_act_backward_cpu(g, h, bias_grad, act, slope, out_grad=None, out_weight=None, out_weight_grad=None):
    from .._ext import _C

    M, R, C = g.shape
    if R == 0:  # sums over no rows
        for t in (bias_grad, out_weight_grad):
            if t is not None:
                t.zero_()
    if g.numel():
        _C.bias_act_backward_cpu(g.data_ptr(), h.data_ptr(), _ptr(bias_grad), _ptr(out_grad), _ptr(out_weight),
                                 _ptr(out_weight_grad), g.dtype == torch.float64, M, R, C, ACT_CODES[act], slope)
