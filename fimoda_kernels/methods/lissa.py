"""LiSSA (Gauss–Newton) and LiSSA-H (true Hessian) influence (MATH.md §3, §5).

score(z, i) = g_iᵀ h_z with h_z the LiSSA estimate of (M + λI)^{-1} g_z for all test points at
once (one batched recursion, a fresh seeded minibatch per iteration shared by all of them).
``damping`` is the absolute λ, as torch-influence's ``damp`` (which the paper's code called): its step
h ← v + h − (M h + λh)/s is MATH.md §5's recursion with d = λ/s, so the fixed point does not move
with the scale and CG and LiSSA with the same damping solve the same system.
Memory: as CG's (about 5–7 rows of p per test point), plus the HVP operator's chunk of max_memory.
"""
from __future__ import annotations

import dataclasses

from .._validate import check_float, check_int, check_seed
from ..grads import per_sample_grads
from ..hvp import gn_hvp, hessian_hvp
from ..inner_products import grad_dot_vectors
from ..solvers import LiSSADivergedError, lissa as lissa_solve, lissa_scale_ladder
from ._common import Options, dense_loss_grads, join_infos, self_chunks
from .cg import SELF_ROWS, resolve_damping


@dataclasses.dataclass
class LiSSAOptions(Options):
    """Attributes:
        damping: λ (absolute; the recursion's d = λ/scale); None = 100·λ₀ (paper code).
        depth: iterations per recursion (paper: 5000).
        scale: s, or "auto" = the smallest of 10, 20, 50, 100, ... that does not diverge.
        repeat: independent recursions averaged.
        batch_size: minibatch size of each iteration's HVP.
        seed: seeds the minibatch draws.
        max_growth: the solver's spectral check (:func:`~fimoda_kernels.lissa`): a scale at which some
            eigendirection of the full-data curvature would grow more than this over the depth counts as
            diverging; None turns the check off (only the run-time norm check, as torch-influence has none).
    """
    damping: float | None = None
    depth: int = 5000
    scale: float | str = "auto"
    repeat: int = 1
    batch_size: int = 128
    seed: int = 0
    max_growth: float | None = 10.0

    def validate(self):
        super().validate()
        if self.damping is not None:
            self.damping = check_float("damping", self.damping, min_value=0.0)
        self.depth = check_int("depth", self.depth, min_value=1)
        if self.scale != "auto":
            self.scale = check_float("scale", self.scale, positive=True)
        self.repeat = check_int("repeat", self.repeat, min_value=1)
        self.batch_size = check_int("batch_size", self.batch_size, min_value=1)
        self.seed = check_seed("seed", self.seed)
        if self.max_growth is not None:
            self.max_growth = check_float("max_growth", self.max_growth, min_value=1.0)
        return self


@dataclasses.dataclass
class LiSSAHOptions(LiSSAOptions):
    """LiSSA with the true Hessian (forward-over-reverse HVPs); fields as :class:`LiSSAOptions`."""


def _solve(hvp, V, opts, damping, scale):
    return lissa_solve(hvp, V, opts.depth, scale, damping, repeat=opts.repeat,
                       batch_size=min(opts.batch_size, hvp.num_samples), seed=opts.seed, absolute_damping=True,
                       max_growth=opts.max_growth, return_info=True)


def _lissa(model, task, train, test, opts, make_hvp):
    damping = resolve_damping(model, task, train, opts)
    hvp = make_hvp(model, task, train[0], train[1])
    H, info = _solve(hvp, dense_loss_grads(model, task, test, opts.max_memory), opts, damping, opts.scale)
    scores = grad_dot_vectors(model, task, train[0], train[1], H, "loss", opts.max_memory)
    return scores, {"damping": damping, "lissa": info}


def _lissa_self(model, task, train, opts, make_hvp):
    """g_iᵀ h_i, each training chunk its own right-hand sides (:func:`self_chunks`), all at one scale
    as one batched call would run them (the draws are shared, so each row's recursion is that call's):
    with scale="auto" the first chunk picks it; should a later chunk diverge there, every chunk runs
    again from the ladder's next rung."""
    damping = resolve_damping(model, task, train, opts)
    hvp = make_hvp(model, task, train[0], train[1])
    x, y = train
    scale = opts.scale
    while True:
        infos, used = [], [scale]

        def chunk(start, stop):
            V = per_sample_grads(model, task, x[start:stop], y[start:stop], "loss", opts.max_memory)
            H, info = _solve(hvp, V, opts, damping, used[0])
            infos.append(info)
            used[0] = info["scale"]
            return (V * H).sum(1)

        try:
            out = self_chunks(x.shape[0], opts.max_memory, SELF_ROWS * hvp.num_params * hvp.dtype.itemsize, chunk)
            return out, {"damping": damping, "lissa": join_infos(infos)}
        except LiSSADivergedError:
            higher = [s for s in lissa_scale_ladder() if opts.scale == "auto" and used[0] != "auto" and s > used[0]]
            if not higher:  # a fixed scale, or the first chunk found none: as attribute would
                raise
            scale = higher[0]


def lissa(model, task, train, test, opts):
    return _lissa(model, task, train, test, opts, gn_hvp)


def lissa_h(model, task, train, test, opts):
    return _lissa(model, task, train, test, opts, hessian_hvp)


def lissa_self(model, task, train, opts):
    return _lissa_self(model, task, train, opts, gn_hvp)


def lissa_h_self(model, task, train, opts):
    return _lissa_self(model, task, train, opts, hessian_hvp)
