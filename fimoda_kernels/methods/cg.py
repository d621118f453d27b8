"""CG influence (MATH.md §3): score(z, i) = g_zᵀ (G + λI)^{-1} g_i with the Gauss–Newton G.

The test gradients are the right-hand sides: X = (G + λI)^{-1} g_z for all test points at once by
batched CG, then score = g_iᵀ X from factored training gradients (no n_train × p matrix).
Constant: none (λ enters only through the solve).
Memory: the test gradients and the solver's vectors, about SELF_ROWS = 8 rows of p per test point
(measured 5–7·n_test·p·itemsize), plus the HVP operator's chunk of max_memory; the training side
is streamed in chunks of max_memory.
"""
from __future__ import annotations

import dataclasses

from .._validate import check_float, check_int
from ..grads import per_sample_grads
from ..hvp import gn_hvp
from ..inner_products import grad_dot_vectors
from ..solvers import cg as cg_solve
from ._common import Options, base_damping, dense_loss_grads, join_infos, self_chunks


@dataclasses.dataclass
class CGOptions(Options):
    """Attributes:
        damping: λ; None = 100·λ₀ with λ₀ the mean squared training-gradient entry (paper code).
        tol: relative residual at which each right-hand side's CG stops.
        max_iter: CG iterations at most (None = the solver's default).
    """
    damping: float | None = None
    tol: float = 1e-6
    max_iter: int | None = None

    def validate(self):
        super().validate()
        if self.damping is not None:
            self.damping = check_float("damping", self.damping, min_value=0.0)
        self.tol = check_float("tol", self.tol, positive=True)
        if self.max_iter is not None:
            self.max_iter = check_int("max_iter", self.max_iter, min_value=1)
        return self


def resolve_damping(model, task, train, opts, factor: float = 100.0) -> float:
    return opts.damping if opts.damping is not None else factor * base_damping(model, task, train, opts.max_memory)


# A final relative residual this far above tol is no solution (e.g. λ = 0 with a singular G gives
# scores of 1e18): refused, where the solver only warns (a warning is easily filtered away).
FAILED_RESIDUAL = 1e-2


# [c, p] rows a CG self-influence chunk holds per sample: its gradients, the solution and the
# solver's residual, direction and product vectors, and their temporaries
SELF_ROWS = 8


def solve(model, task, train, rhs, opts, damping, hvp=None):
    """(G + λI)^{-1} for every row of ``rhs [r, p]`` (one batched CG), and the solver's info."""
    hvp = hvp if hvp is not None else gn_hvp(model, task, train[0], train[1], max_memory=opts.max_memory)
    kwargs = {} if opts.max_iter is None else {"max_iter": opts.max_iter}
    X, info = cg_solve(hvp, rhs, damping, tol=opts.tol, **kwargs)
    worst = float(info["final_residual"].max()) if rhs.shape[0] else 0.0
    if not worst <= max(FAILED_RESIDUAL, opts.tol):
        raise ValueError(f"damping: CG left a relative residual of {worst:.3g} (tol {opts.tol:g}) after "
                         f"{int(info['iterations'].max())} iterations: G + λI at λ = {damping:g} is too "
                         "ill-conditioned or singular for it; raise the damping (or max_iter)")
    return X, info


def cg(model, task, train, test, opts):
    damping = resolve_damping(model, task, train, opts)
    X, info = solve(model, task, train, dense_loss_grads(model, task, test, opts.max_memory), opts, damping)
    scores = grad_dot_vectors(model, task, train[0], train[1], X, "loss", opts.max_memory)
    return scores, {"damping": damping, "cg": info}


def cg_self(model, task, train, opts):
    """g_iᵀ (G + λI)^{-1} g_i, each training chunk solved as its own right-hand sides (:func:`self_chunks`)."""
    damping = resolve_damping(model, task, train, opts)
    hvp = gn_hvp(model, task, train[0], train[1], max_memory=opts.max_memory)
    x, y = train
    infos = []

    def chunk(start, stop):
        V = per_sample_grads(model, task, x[start:stop], y[start:stop], "loss", opts.max_memory)
        X, info = solve(model, task, train, V, opts, damping, hvp)
        infos.append(info)
        return (V * X).sum(1)

    out = self_chunks(x.shape[0], opts.max_memory, SELF_ROWS * hvp.num_params * hvp.dtype.itemsize, chunk)
    return out, {"damping": damping, "cg": join_infos(infos)}
