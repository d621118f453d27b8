"""Generalized influence (MATH.md §3: Prop. 1, Cor. 2, eq. 16), for a final model θ* that need not be
a stationary point of the training loss.

Newton step on the full training set: Δ_D = −(G + λI)^{-1} ∇R_D(θ*) by CG (Gauss–Newton G). Then
score(z, i) = g_zᵀ (G + λI)^{-1} g̃_i with
- form "gn" (Cor. 2): g̃_i = (φ'_i + φ''_i ∇f_iᵀΔ_D) ∇f_i — each training gradient keeps its
  direction, its loss derivative re-evaluated at the output predicted after the Newton step;
- form "eq16": g̃_i = ∇ℓ_i(θ* + Δ_D).
When θ* is stationary (∇R_D = 0) Δ_D = 0 and both equal the CG influence with the same λ.
"""
from __future__ import annotations

import copy
import dataclasses

import torch

from .._validate import check_choice
from ..grads import per_sample_grads
from ..hvp import gn_hvp
from ..inner_products import grad_dot_vectors
from ._common import dense_loss_grads, flat_params, join_infos, mean_loss_grad, outputs, self_chunks
from .cg import SELF_ROWS, CGOptions, resolve_damping, solve

FORMS = ("gn", "eq16")


@dataclasses.dataclass
class GeneralizedIFOptions(CGOptions):
    """Attributes (besides :class:`CGOptions`'s damping, tol, max_iter, used for the one batched solve):
        form: "gn" (Corollary 2, default) or "eq16" (gradients re-evaluated at θ* + Δ_D).
    """
    form: str = "gn"

    def validate(self):
        super().validate()
        self.form = check_choice("form", self.form, FORMS)
        return self


def generalized_if(model, task, train, test, opts):
    damping = resolve_damping(model, task, train, opts)
    # one batched CG: the test gradients and ∇R_D (its solution gives Δ_D = −(G + λI)^{-1} ∇R_D)
    rhs = torch.cat([dense_loss_grads(model, task, test, opts.max_memory),
                     mean_loss_grad(model, task, train).detach()])
    sol, info = solve(model, task, train, rhs, opts, damping)
    X, delta = sol[:-1], -sol[-1:]
    if opts.form == "gn":
        FX = grad_dot_vectors(model, task, train[0], train[1], torch.cat([X, delta]), "output", opts.max_memory)
        _, d1, d2 = outputs(model, task, train)
        scores = (d1 + d2 * FX[:, -1]).to(FX.dtype)[:, None] * FX[:, :-1]
    else:
        scores = grad_dot_vectors(_shifted(model, delta), task, train[0], train[1], X, "loss", opts.max_memory)
    return scores, {"damping": damping, "newton_step_norm": float(delta.norm()), "cg": info}


def _shifted(model, delta):
    """A copy of ``model`` at θ* + Δ_D (eq. 16's evaluation point)."""
    shifted = copy.deepcopy(model)
    with torch.no_grad():
        torch.nn.utils.vector_to_parameters(
            torch.nn.utils.parameters_to_vector(flat_params(shifted)) + delta[0], flat_params(shifted))
    return shifted


def generalized_if_self(model, task, train, opts):
    """score(i, i), each training chunk solved as its own right-hand sides (:func:`self_chunks`);
    Δ_D from one solve first (the batched call solves it with the test points: CG treats every
    right-hand side independently)."""
    damping = resolve_damping(model, task, train, opts)
    hvp = gn_hvp(model, task, train[0], train[1], max_memory=opts.max_memory)
    sol, info = solve(model, task, train, mean_loss_grad(model, task, train).detach(), opts, damping, hvp)
    delta = -sol
    x, y = train
    _, d1, d2 = outputs(model, task, train)
    at = model if opts.form == "gn" else _shifted(model, delta)
    infos = [info]

    def chunk(start, stop):
        V = per_sample_grads(model, task, x[start:stop], y[start:stop], "loss", opts.max_memory)
        X, info = solve(model, task, train, V, opts, damping, hvp)
        infos.append(info)
        if opts.form == "eq16":
            return (per_sample_grads(at, task, x[start:stop], y[start:stop], "loss", opts.max_memory) * X).sum(1)
        F = per_sample_grads(model, task, x[start:stop], y[start:stop], "output", opts.max_memory)
        return ((d1[start:stop] + d2[start:stop] * (F @ delta[0])) * (F * X).sum(1)).to(X.dtype)

    out = self_chunks(x.shape[0], opts.max_memory, (SELF_ROWS + 1) * hvp.num_params * hvp.dtype.itemsize, chunk)
    return out, {"damping": damping, "newton_step_norm": float(delta.norm()), "cg": join_infos(infos[1:])}
