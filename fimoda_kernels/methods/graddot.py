"""Grad-Dot and Grad-Cos (MATH.md §3, eq. 6): g_zᵀ g_i and its cosine, from factored inner products."""
from __future__ import annotations

import dataclasses

from ..inner_products import grad_dot_model, grad_sq_norms
from ._common import Options


@dataclasses.dataclass
class GradDotOptions(Options):
    """Grad-Dot: score(z, i) = ∇ℓ_zᵀ ∇ℓ_i. No hyperparameters beyond :class:`Options`."""


@dataclasses.dataclass
class GradCosOptions(Options):
    """Grad-Cos: score(z, i) = ∇ℓ_zᵀ ∇ℓ_i / (‖∇ℓ_z‖ ‖∇ℓ_i‖) (a zero gradient scores 0)."""


def grad_dot(model, task, train, test, opts, normalize=False):
    scores, info = grad_dot_model(model, task, train, test, normalize=normalize, max_memory=opts.max_memory,
                                  backend=opts.backend, return_info=True)
    return scores, info


def grad_cos(model, task, train, test, opts):
    return grad_dot(model, task, train, test, opts, normalize=True)


def grad_dot_self(model, task, train, opts):
    """‖∇ℓ_i‖² without the n × n product."""
    norms = grad_sq_norms(model, task, train[0], train[1], "loss", opts.max_memory)
    return sum(sq for _, sq in norms.values()), {}


def grad_cos_self(model, task, train, opts):
    """The cosine of a gradient with itself: 1 (0 for a zero gradient)."""
    sq, info = grad_dot_self(model, task, train, opts)
    return (sq > 0).to(sq.dtype), info
