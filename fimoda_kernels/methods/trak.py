"""TRAK with one model (MATH.md §7): score(z, i) = φ_zᵀ (ΦᵀΦ)^{-1} φ_i · (−φ'_i).

φ = Pᵀ∇f (projected output gradients, :func:`project_model` with ``wrt="output"``), Φ ``[n, k]`` the
training set's rows, λ = 0 and Q = I as in TRAK, solved in float64:

- k ≤ n: the k × k kernel ΦᵀΦ by Cholesky. It is singular when p < k (rank(Φ) ≤ p); then the
  smallest jitter ε·tr(ΦᵀΦ)/k (ε = 1e-12, ×10 until the factorization succeeds) is added and
  reported as ``info["jitter"]`` — as ε → 0 this is the pseudo-inverse, which for k ≥ p gives the
  exact GN-inverse formula ∇f_zᵀ (JᵀJ)^{-1} ∇f_i (−φ'_i).
- k > n: ΦᵀΦ has rank ≤ n < k, and the jitter's limit is computed exactly instead (a jittered
  k × k system has a condition number near 1/ε, whose rounding swamps the result):
  Φ (ΦᵀΦ)⁺ Φ_teᵀ = (Φ⁺)ᵀ Φ_teᵀ = R^{-1} Qᵀ Φ_teᵀ from the QR factorization Φᵀ = QR (k × n), which
  works on Φ itself (error ∝ cond(Φ), not cond(Φ)² as a Gram matrix would). When R's diagonal shows
  dependent rows (some |R_jj| ≤ √ε·max |R_jj|: duplicated training points, or p < n), the
  pseudo-inverse comes from the SVD of Φ instead, without the singular values below √ε·σ_max (the
  jitter's ε on the scale of Φ); how many were dropped is ``info["dropped"]``.

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


EPS = 1e-12  # the Gram matrix's relative jitter; on Φ's scale (singular values) its root, √EPS


def cholesky_with_jitter(K: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Cholesky factor of the symmetric PSD ``K`` (float64), adding ε·tr(K)/k·I only if needed."""
    L, bad = torch.linalg.cholesky_ex(K)
    if int(bad) == 0:
        return L, 0.0
    base = float(K.diagonal().mean())
    eps = EPS
    while eps < 1:
        jitter = eps * base
        L, bad = torch.linalg.cholesky_ex(K + jitter * torch.eye(K.shape[0], dtype=K.dtype, device=K.device))
        if int(bad) == 0:
            return L, jitter
        eps *= 10
    raise ValueError("trak: ΦᵀΦ could not be factored even with a jitter of tr/k; check for non-finite gradients")


def row_space_solve(P: torch.Tensor, B: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Φ (ΦᵀΦ)⁺ B = (Φ⁺)ᵀ B for ``P`` = Φ ``[n, k]``, n < k (float64), and the number of singular
    directions dropped (module docstring)."""
    cut = EPS ** 0.5
    Q, R = torch.linalg.qr(P.T)  # Φᵀ = QR, so (Φ⁺)ᵀ = R^{-1} Qᵀ when Φ has full row rank
    d = R.diagonal().abs()
    if float(d.min()) > cut * float(d.max()):
        return torch.linalg.solve_triangular(R, Q.T @ B, upper=True), 0
    U, sv, Vh = torch.linalg.svd(P, full_matrices=False)  # (Φ⁺)ᵀ = U diag(1/σ) Vh on the kept σ
    keep = sv > cut * sv[0]
    return U[:, keep] @ ((Vh[keep] @ B) / sv[keep][:, None]), int((~keep).sum())


def trak(model, task, train, test, opts):
    proj = dict(k=opts.proj_dim, seed=opts.seed, wrt="output", kind=opts.kind, max_memory=opts.max_memory,
                backend=opts.backend)
    Phi = project_model(model, task, train[0], train[1], **proj)
    Phi_te = project_model(model, task, test[0], test[1], **proj)
    P, P_te = Phi.double(), Phi_te.double()
    for name, t in (("training", P), ("test", P_te)):  # the QR / SVD path would turn Inf into zeros
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"trak: non-finite projected {name} gradients; check the model and data")
    if not bool(P.any()):
        raise ValueError("trak: the projected training gradients are all zero (Φ = 0); nothing to attribute")
    jitter, dropped = 0.0, 0
    if P.shape[1] <= P.shape[0]:
        # (ΦᵀΦ)^{-1} φ_z for all test points, then rows of Φ against it
        L, jitter = cholesky_with_jitter(P.T @ P)
        S = P @ torch.cholesky_solve(P_te.T, L)
    else:  # ΦᵀΦ is singular: its pseudo-inverse limit from Φ's n-dimensional row space
        S, dropped = row_space_solve(P, P_te.T)
    _, d1, _ = outputs(model, task, train)
    scores = S * (-d1.double())[:, None]
    return scores.to(Phi.dtype), {"jitter": jitter, "dropped": dropped, "proj_dim": opts.proj_dim}
