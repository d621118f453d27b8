"""One optimizer step for every model of an ensemble at once (MATH.md §2, the fused weighted-loss update).

The further-training engine keeps the parameters of M models in one flat buffer made of blocks:
block j (one parameter tensor of the model, ``segments[j]`` entries per model) is a row-major
``[M, segments[j]]`` array, the blocks one after the other. Gradients and optimizer state use the same
layout. :func:`ensemble_step` applies the update of ``torch.optim.SGD`` (momentum, weight decay, no
dampening or Nesterov), ``torch.optim.Adam`` (L2 weight decay) or ``torch.optim.AdamW`` (decoupled weight
decay) to every model in one pass, with each model's own step count (Adam's bias corrections, SGD's
first-step momentum buffer ``buf = g``) and an ``active`` mask (a model without a batch in this step is
left untouched: parameters, state and step count). The arithmetic follows torch.optim's single-tensor
code operation by operation, hyperparameters rounded to the parameters' dtype as torch does:

- SGD: g ← grad + wd·θ; buf ← g (first step) or buf·μ + g; θ ← θ + (−lr)·buf (buf = g when μ = 0);
- Adam: g ← grad + wd·θ; AdamW: θ ← θ·(1 − lr·wd), g ← grad; then m ← m + (1−β1)·(g − m) (lerp),
  v ← v·β2 + (1−β2)·g·g, denom ← √v / √(1−β2^t) + eps, θ ← θ + ((−lr/(1−β1^t))·m) / denom.

Backends: cpu (csrc/cpu/ensemble_step.cpp, OpenMP over (model, tile) pairs, one pass over memory),
cuda (csrc/cuda/ensemble_step.cu), triton, torch (the reference). The bias corrections are computed per
model in Python floats (as torch.optim does), tabulated once per step number, and passed as a small
[M, 3] table.
"""
from __future__ import annotations

import functools
from typing import Sequence

import torch

from .._dispatch import cuda_stream, op
from .._ext import _C
from .._validate import check_choice, check_disjoint, bump_version, check_float, check_int, check_input

OPTIMIZERS = ("sgd", "adam", "adamw")
_OPT_CODE = {"sgd": 0, "adam": 1, "adamw": 2}
_DTYPES = (torch.float32, torch.float64)

_OP = op("ensemble_step")


def adam_corrections(lr: float, betas: tuple[float, float], steps) -> torch.Tensor:
    """float64 [len(steps), 2]: per step number t, (lr / (1 − β1^t), (1 − β2^t) ** 0.5) in Python floats
    as torch.optim's single-tensor Adam computes them (tensor pow and ``lr / x`` differ by an ulp at
    some steps); zeros for t = 0 (no step yet)."""
    return torch.tensor([(lr / (1 - betas[0] ** t), (1 - betas[1] ** t) ** 0.5) if t > 0 else (0.0, 0.0)
                         for t in steps], dtype=torch.float64)


def model_coefficients(step: torch.Tensor, active: torch.Tensor | None, optimizer: str, lr: float,
                       betas: tuple[float, float], corrections: torch.Tensor | None = None) -> torch.Tensor:
    """Per-model float64 table [M, 3]: (active, a, b) with SGD a = 1 on a model's first step (b unused),
    Adam(W) (a, b) = row ``step`` of ``corrections`` (``adam_corrections(lr, betas, range(T + 1))`` on
    step's device), or, without it, :func:`adam_corrections` of the distinct step numbers (a device
    sync)."""
    coef = torch.zeros(step.shape[0], 3, dtype=torch.float64, device=step.device)
    coef[:, 0] = 1.0 if active is None else active.to(torch.float64)
    if optimizer == "sgd":
        coef[:, 1] = (step == 1).to(torch.float64)
    elif corrections is not None:
        coef[:, 1:] = corrections[step]
    else:
        distinct, inverse = torch.unique(step, return_inverse=True)
        coef[:, 1:] = adam_corrections(lr, betas, distinct.tolist()).to(step.device)[inverse]
    return coef


def hyperparameters(optimizer: str, lr: float, momentum: float, weight_decay: float,
                    betas: tuple[float, float], eps: float) -> list[float]:
    """The scalars every backend reads, in float64, in the order the kernels expect:
    (−lr, momentum, weight_decay, 1 − β1, β2, 1 − β2, eps, 1 − lr·wd)."""
    return [-lr, momentum, weight_decay, 1.0 - betas[0], betas[1], 1.0 - betas[1], eps, 1.0 - lr * weight_decay]


def _ensemble_step_reference(params, grads, state1, state2, coef, segments, optimizer, hp) -> None:
    """Plain torch, one parameter block at a time, the same tensor operations as torch.optim
    (grad.add(param, alpha=wd), buf.mul_(μ).add_(g), lerp_, mul_().addcmul_(), addcdiv); models that
    are not active are restored afterwards. float64 inputs give a float64 oracle."""
    M = coef.shape[0]
    neg_lr, mom, wd, one_m_b1, b2, one_m_b2, eps, decay = hp
    active = coef[:, 0].to(torch.bool)[:, None]
    first = coef[:, 1].to(torch.bool)[:, None]
    step_size = coef[:, 1:2].to(params.dtype)
    bc2_sqrt = coef[:, 2:3].to(params.dtype)
    off = 0
    for n in segments:
        sl = slice(off, off + M * n)
        off += M * n
        p, g = params[sl].view(M, n), grads[sl].view(M, n)
        p_new = p.clone()
        if optimizer == "sgd":
            if wd != 0:
                g = g.add(p_new, alpha=wd)
            if mom != 0:
                buf = state1[sl].view(M, n)
                buf_new = torch.where(first, g, buf.mul(mom).add(g))
                buf.copy_(torch.where(active, buf_new, buf))
                g = buf_new
            p_new.add_(g, alpha=neg_lr)
        else:
            if optimizer == "adamw":
                p_new.mul_(decay)
            elif wd != 0:
                g = g.add(p_new, alpha=wd)
            m, v = state1[sl].view(M, n), state2[sl].view(M, n)
            m_new = m.lerp(g, one_m_b1)
            v_new = v.mul(b2).addcmul_(g, g, value=one_m_b2)
            denom = (v_new.sqrt() / bc2_sqrt).add_(eps)
            p_new = p_new + (-step_size) * m_new / denom
            m.copy_(torch.where(active, m_new, m))
            v.copy_(torch.where(active, v_new, v))
        p.copy_(torch.where(active, p_new, p))


def _check_state(name, t, params, needed: bool):
    if not needed:
        return None
    if t is None:
        raise ValueError(f"{name}: required for this optimizer, got None")
    check_input(name, t, dtypes=(params.dtype,), device=params.device)
    if t.shape != params.shape or not t.is_contiguous():
        raise ValueError(f"{name}: expected a contiguous tensor of shape {tuple(params.shape)} (as params), "
                         f"got shape {tuple(t.shape)}{'' if t.is_contiguous() else ' (not contiguous)'}")
    return t


def ensemble_step(params: torch.Tensor, grads: torch.Tensor, step: torch.Tensor, *, optimizer: str, lr: float,
                  momentum: float = 0.0, weight_decay: float = 0.0, betas: Sequence[float] = (0.9, 0.999),
                  eps: float = 1e-8, state1: torch.Tensor | None = None, state2: torch.Tensor | None = None,
                  active: torch.Tensor | None = None, segments: Sequence[int] | None = None,
                  backend: str | None = None) -> None:
    """Apply one SGD / Adam / AdamW step to M models in place (layout and formulas: module docstring).

    Args:
        params: contiguous float32/float64, ``[M, P]`` or flat ``[M·P]``; updated in place.
        grads: the models' gradients of their weighted losses, same shape, dtype and device (read only).
        step: int64 ``[M]``: each model's step number counting this step (1 on its first step).
        optimizer: "sgd", "adam" or "adamw". lr > 0; momentum in [0, 1) (SGD); weight_decay >= 0;
            betas in [0, 1); eps > 0 (Adam/AdamW).
        state1: SGD momentum buffer (needed when momentum != 0) or Adam's exp_avg; state2: Adam's
            exp_avg_sq. Same shape as params; updated in place; their content on a model's first step
            is ignored by SGD (buf = g) and must be zeros for Adam (as torch initializes it).
        active: bool ``[M]`` or None (all): inactive models are not changed at all.
        segments: per-model sizes of the parameter blocks, summing to P (default one block ``[M, P]``).
        backend: "cuda", "triton", "cpu", "torch" or None.
    """
    optimizer = check_choice("optimizer", optimizer, OPTIMIZERS)
    check_input("params", params, ndim=(1, 2), dtypes=_DTYPES)
    if not params.is_contiguous():
        raise ValueError("params: expected a contiguous tensor")
    check_input("grads", grads, dtypes=(params.dtype,), device=params.device)
    if grads.shape != params.shape or not grads.is_contiguous():
        raise ValueError(f"grads: expected a contiguous tensor of shape {tuple(params.shape)}, got "
                         f"{tuple(grads.shape)}")
    check_input("step", step, ndim=1, dtypes=(torch.int64,), device=params.device)
    M = step.shape[0]
    if params.dim() == 2 and params.shape[0] != M:
        raise ValueError(f"step: expected {params.shape[0]} entries (one per model, params' rows), got {M}")
    if M == 0 or params.numel() % M:
        raise ValueError(f"params: expected M·P entries for M = {M} models (step's length), got {params.numel()}")
    P = params.numel() // M
    segments = (P,) if segments is None else tuple(check_int(f"segments[{j}]", s, min_value=1)
                                                  for j, s in enumerate(segments))
    if sum(segments) != P:
        raise ValueError(f"segments: expected block sizes summing to P = {P}, got {list(segments)} "
                         f"(sum {sum(segments)})")
    hyper = check_hyperparameters(optimizer, lr, momentum, weight_decay, betas, eps)
    if active is not None:
        check_input("active", active, ndim=1, dtypes=(torch.bool,), device=params.device)
        if active.shape[0] != M:
            raise ValueError(f"active: expected {M} entries, got {active.shape[0]}")
    state1 = _check_state("state1", state1, params, optimizer != "sgd" or momentum != 0)
    state2 = _check_state("state2", state2, params, optimizer != "sgd")
    check_disjoint("params", params, grads=grads)
    check_disjoint("state1", state1, params=params, grads=grads, state2=state2)
    check_disjoint("state2", state2, params=params, grads=grads)
    if bool((step[active] if active is not None else step).lt(1).any()):
        raise ValueError(f"step: expected step numbers >= 1 for the active models, got min {int(step.min())}")
    with torch.no_grad():  # an optimizer step (leaf parameters may require grad, as with torch.optim)
        EnsembleStepper(optimizer, *hyper, segments=segments, device=params.device, dtype=params.dtype,
                        backend=backend)(params, grads, step, state1, state2, active)
    bump_version(params, state1, state2)


def check_hyperparameters(optimizer, lr, momentum, weight_decay, betas, eps):
    """The optimizer's validated (lr, momentum, weight_decay, betas, eps); momentum is SGD's only."""
    optimizer = check_choice("optimizer", optimizer, OPTIMIZERS)
    lr = check_float("lr", lr, positive=True)
    momentum = check_float("momentum", momentum, min_value=0.0)
    if momentum >= 1 or (momentum and optimizer != "sgd"):
        raise ValueError(f"momentum: expected a number in [0, 1) with optimizer 'sgd' (0 otherwise), got "
                         f"{momentum} with {optimizer!r}")
    weight_decay = check_float("weight_decay", weight_decay, min_value=0.0)
    eps = check_float("eps", eps, positive=True)
    if len(betas) != 2:
        raise ValueError(f"betas: expected two numbers (beta1, beta2), got {betas!r}")
    betas = tuple(check_float(f"betas[{k}]", b, min_value=0.0) for k, b in enumerate(betas))
    if max(betas) >= 1:
        raise ValueError(f"betas: expected numbers in [0, 1), got {betas}")
    return lr, momentum, weight_decay, betas, eps


class EnsembleStepper:
    """:func:`ensemble_step` with the hyperparameters checked and the backend chosen once, for loops
    over many steps of the same buffers (the further-training engine): a call only builds the per-model
    coefficient table and runs the kernel. Arguments as :func:`ensemble_step` (already validated)."""

    def __init__(self, optimizer: str, lr: float, momentum: float, weight_decay: float, betas, eps: float, *,
                 segments: Sequence[int], device, dtype: torch.dtype = torch.float32, backend: str | None = None,
                 max_step: int | None = None):
        """``max_step``: the largest step number any model will reach (Adam's bias corrections are
        tabulated up to it once, on the device); None: computed per call (a device sync per step)."""
        self.optimizer, self.lr, self.betas = check_choice("optimizer", optimizer, OPTIMIZERS), lr, tuple(betas)
        self.max_step, self._corrections = max_step, None
        self.hp = hyperparameters(optimizer, lr, momentum, weight_decay, self.betas, eps)
        self.segments = tuple(segments)
        self._per_model = sum(self.segments)
        probe = torch.empty(0, dtype=dtype, device=device)
        self.impl = _OP.select(backend, torch.device(device), probe)

    def __call__(self, params, grads, step, state1=None, state2=None, active=None) -> None:
        # cheap checks only (a call per training step); the kernels index raw pointers by these sizes
        n = step.shape[0] * self._per_model
        if params.numel() != n or grads.numel() != n:
            raise ValueError(f"params, grads: expected {n} entries (len(step) × sum(segments)), got "
                             f"{params.numel()} and {grads.numel()}")
        for name, t, needed in (("state1", state1, self.optimizer != "sgd" or self.hp[1] != 0),
                                ("state2", state2, self.optimizer != "sgd")):
            if needed and (t is None or t.numel() != n):
                raise ValueError(f"{name}: expected {n} entries for {self.optimizer!r}, got "
                                 f"{'None' if t is None else t.numel()}")
        if self.optimizer != "sgd" and self.max_step is not None and self._corrections is None:
            self._corrections = adam_corrections(self.lr, self.betas, range(self.max_step + 1)).to(step.device)
        coef = model_coefficients(step, active, self.optimizer, self.lr, self.betas, self._corrections)
        self.impl.fn(params.view(-1), grads.view(-1), None if state1 is None else state1.view(-1),
                     None if state2 is None else state2.view(-1), coef, self.segments, self.optimizer, self.hp)


@_OP.register("torch")
def _ensemble_step_torch(params, grads, state1, state2, coef, segments, optimizer, hp):
    _ensemble_step_reference(params, grads, state1, state2, coef, segments, optimizer, hp)


def _addr(t):
    return 0 if t is None else t.data_ptr()


@functools.lru_cache(maxsize=256)
def _device_table(values: tuple, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The kernels' small argument tables (segments, hyperparameters), copied to the device once: a
    fresh host-to-device copy per step would wait for the device to drain, every step."""
    return torch.tensor(values, dtype=dtype, device=device)


@_OP.register("cpu")
def _ensemble_step_cpu(params, grads, state1, state2, coef, segments, optimizer, hp):
    _C.ensemble_step_cpu(params.data_ptr(), grads.data_ptr(), _addr(state1), _addr(state2), coef.data_ptr(),
                         list(segments), coef.shape[0], params.dtype == torch.float64, _OPT_CODE[optimizer], hp)


@_OP.register("cuda")
def _ensemble_step_cuda(params, grads, state1, state2, coef, segments, optimizer, hp):
    seg = _device_table(tuple(segments), torch.int64, params.device)
    _C.ensemble_step_cuda(params.data_ptr(), grads.data_ptr(), _addr(state1), _addr(state2), coef.data_ptr(),
                          seg.data_ptr(), len(segments), max(segments), coef.shape[0],
                          params.dtype == torch.float64, _OPT_CODE[optimizer], hp, cuda_stream(params.device))


@_OP.register("triton")
def _ensemble_step_triton(params, grads, state1, state2, coef, segments, optimizer, hp):
    from ..triton.ensemble_step import ensemble_step as kernel

    kernel(params, grads, state1, state2, coef, _device_table(tuple(segments), torch.int64, params.device),
           _device_table(tuple(hp), params.dtype, params.device), max(segments), _OPT_CODE[optimizer],
           momentum=hp[1] != 0.0, decay=hp[2] != 0.0)


def state_buffers(optimizer: str, momentum: float, like: torch.Tensor) -> tuple:
    """Zero-initialized (state1, state2) for :func:`ensemble_step` (None where not used)."""
    s1 = torch.zeros_like(like) if optimizer != "sgd" or momentum != 0 else None
    s2 = torch.zeros_like(like) if optimizer != "sgd" else None
    return s1, s2


__all__ = ["ensemble_step", "EnsembleStepper", "OPTIMIZERS", "state_buffers"]

