"""TRAK with one model (MATH.md §7): score(z, i) = φ_zᵀ (ΦᵀΦ)^{-1} φ_i · (−φ'_i).

φ = Pᵀ∇f (projected output gradients, :func:`project_model` with ``wrt="output"``), Φ the training
set's rows, λ = 0 and Q = I as in TRAK. The k × k kernel ΦᵀΦ is factored by Cholesky in float64.
It is singular whenever n_train < k or p < k; then the smallest jitter ε·tr(ΦᵀΦ)/k (ε = 1e-12,
×10 until the factorization succeeds) is added and reported as ``info["jitter"]`` — as ε → 0 this
is the pseudo-inverse, which for k ≥ p gives the exact GN-inverse formula
∇f_zᵀ (JᵀJ)^{-1} ∇f_i (−φ'_i).

Regression: f is the prediction and −φ'_i = −2(f_i − y_i); the score then measures the point's
effect on the test *prediction*, not the test loss (positive = removing i lowers f_z), so its sign
relative to the loss depends on the test residual. Classification: −φ'_i = 1 − p_i and positive =
helpful, as everywhere.
"""
from __future__ import annotations

import dataclasses

import torch

from .._validate import check_choice, check_int
from ..ops.project import LINEAR_KINDS
from ..projection import project_model
from ._common import Options, outputs


@dataclasses.dataclass
class TRAKOptions(Options):
    """Attributes:
        proj_dim: k, the projection dimension (paper: 2048).
        seed: the projection's seed (MATH.md §9).
        kind: "rademacher", "gaussian" or "kronecker" (see :func:`project_linear`).
    """
    proj_dim: int = 2048
    seed: int = 0
    kind: str = "rademacher"

    def validate(self):
        super().validate()
        self.proj_dim = check_int("proj_dim", self.proj_dim, min_value=1)
        self.seed = check_int("seed", self.seed, min_value=0)
        self.kind = check_choice("kind", self.kind, LINEAR_KINDS)
        return self


def cholesky_with_jitter(K: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Cholesky factor of the symmetric PSD ``K`` (float64), adding ε·tr(K)/k·I only if needed."""
    L, bad = torch.linalg.cholesky_ex(K)
    if int(bad) == 0:
        return L, 0.0
    base = float(K.diagonal().mean())
    if not base > 0:
        raise ValueError("trak: the projected training gradients are all zero (ΦᵀΦ = 0); nothing to attribute")
    eps = 1e-12
    while eps < 1:
        jitter = eps * base
        L, bad = torch.linalg.cholesky_ex(K + jitter * torch.eye(K.shape[0], dtype=K.dtype, device=K.device))
        if int(bad) == 0:
            return L, jitter
        eps *= 10
    raise ValueError("trak: ΦᵀΦ could not be factored even with a jitter of tr/k; check for non-finite gradients")


def trak(model, task, train, test, opts):
    proj = dict(k=opts.proj_dim, seed=opts.seed, wrt="output", kind=opts.kind, max_memory=opts.max_memory,
                backend=opts.backend)
    Phi = project_model(model, task, train[0], train[1], **proj)
    Phi_te = project_model(model, task, test[0], test[1], **proj)
    L, jitter = cholesky_with_jitter(Phi.double().T @ Phi.double())
    # (ΦᵀΦ)^{-1} φ_z for all test points, then rows of Φ against it
    X = torch.cholesky_solve(Phi_te.double().T, L)
    _, d1, _ = outputs(model, task, train)
    scores = (Phi.double() @ X) * (-d1.double())[:, None]
    return scores.to(Phi.dtype), {"jitter": jitter, "proj_dim": opts.proj_dim}
