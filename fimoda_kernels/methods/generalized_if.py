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
from ..inner_products import grad_dot_vectors
from ._common import dense_loss_grads, flat_params, mean_loss_grad, outputs
from .cg import CGOptions, resolve_damping, solve

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
        shifted = copy.deepcopy(model)
        with torch.no_grad():
            torch.nn.utils.vector_to_parameters(
                torch.nn.utils.parameters_to_vector(flat_params(shifted)) + delta[0], flat_params(shifted))
        scores = grad_dot_vectors(shifted, task, train[0], train[1], X, "loss", opts.max_memory)
    return scores, {"damping": damping, "newton_step_norm": float(delta.norm()), "cg": info}
