"""TRAK with one model (MATH.md §7): score(z, i) = φ_zᵀ (ΦᵀΦ)^{-1} φ_i · (−φ'_i).

φ = Pᵀ∇f (projected output gradients, :func:`project_model` with ``wrt="output"``), Φ ``[n, k]`` the
training set's rows, λ = 0 and Q = I as in TRAK, solved in float64 as the pseudo-inverse
Φ (ΦᵀΦ)⁺ Φ_teᵀ at Φ's numerical rank: ΦᵀΦ is singular whenever k exceeds n or the parameter count p
(rank(Φ) ≤ min(n, p, k)), as with the default k = 2048 on small sets or small models, and an inverse
(or a jittered Cholesky factorization) then amplifies rounding: float32 gradients gave errors of
30%. Singular values of Φ below 32·ε·σ_max (ε of the gradients' dtype) count as zero, how many is
``info["dropped"]``:

- k ≤ n: the eigen-decomposition of the k × k Gram matrix ΦᵀΦ (its eigenvalues are σ²; those below
  k·ε₆₄·λ_max, its own rounding, count as zero too).
- k > n: Φ (ΦᵀΦ)⁺ Φ_teᵀ = (Φ⁺)ᵀ Φ_teᵀ = R^{-1} Qᵀ Φ_teᵀ from the QR factorization Φᵀ = QR (k × n),
  which works on Φ itself (error ∝ cond(Φ), not cond(Φ)²); when R's diagonal shows dependent rows
  (duplicated training points, or p < n), from the SVD of Φ instead.

For k ≥ p and full-rank gradients this is the exact GN-inverse formula ∇f_zᵀ (JᵀJ)^{-1} ∇f_i (−φ'_i).

Regression: f is the prediction and −φ'_i = −2(f_i − y_i); the score then measures the point's
effect on the test *prediction*, not the test loss (positive = removing i lowers f_z), so its sign
relative to the loss depends on the test residual. Classification: −φ'_i = 1 − p_i and positive =
helpful, as everywhere.
"""
from __future__ import annotations

import dataclasses

import torch

from .._validate import all_finite, check_choice, check_int, check_seed
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
        self.seed = check_seed("seed", self.seed)
        self.kind = check_choice("kind", self.kind, LINEAR_KINDS)
        return self


def rank_cut(dtype: torch.dtype) -> float:
    """Singular values of Φ below this fraction of the largest are dropped as zero: 32·ε of the precision
    Φ was computed in (float32 gradients carry rounding of ~ε₃₂·σ_max in every direction, which a solve
    would amplify). Not numpy's max(n, k)·ε: at n = 10⁵ that drops real directions of a float32 Φ (a
    spectrum down to 1e-5 came out 79% wrong)."""
    return 32 * torch.finfo(dtype).eps


def pinv(P: torch.Tensor, cut: float):
    """Φ (ΦᵀΦ)⁺ for ``P`` = Φ ``[n, k]`` (float64) at Φ's numerical rank (singular values below
    ``cut``·σ_max dropped, module docstring), as ``(solve, hat, dropped)``: ``solve(B)`` = Φ (ΦᵀΦ)⁺ B for
    ``B [k, m]``, ``hat()`` = diag Φ (ΦᵀΦ)⁺ Φᵀ ``[n]`` (each point's leverage), ``dropped`` how many σ."""
    n, k = P.shape
    if k <= n:  # the k × k Gram matrix's eigenvalues are Φ's σ², its eigenvectors Φ's right ones
        lam, V = torch.linalg.eigh(P.T @ P)
        # eigenvalues below ~k·ε₆₄·λ_max are the Gram matrix's own rounding, whatever Φ's precision
        keep = lam > max(cut ** 2, k * torch.finfo(torch.float64).eps) * lam[-1]
        V, lam = V[:, keep], lam[keep]
        PV = P @ V
        return (lambda B: PV @ ((V.T @ B) / lam[:, None])), (lambda: (PV.square() / lam).sum(1)), int((~keep).sum())
    Q, R = torch.linalg.qr(P.T)  # Φᵀ = QR, so (Φ⁺)ᵀ = R^{-1} Qᵀ when Φ has full row rank
    d = R.diagonal().abs()
    if float(d.min()) > cut * float(d.max()):  # full row rank: Φ (ΦᵀΦ)⁺ Φᵀ = I
        return (lambda B: torch.linalg.solve_triangular(R, Q.T @ B, upper=True)), (lambda: P.new_ones(n)), 0
    U, sv, Vh = torch.linalg.svd(P, full_matrices=False)  # (Φ⁺)ᵀ = U diag(1/σ) Vh on the kept σ
    keep = sv > cut * sv[0]
    U, sv, Vh = U[:, keep], sv[keep], Vh[keep]
    return (lambda B: U @ ((Vh @ B) / sv[:, None])), (lambda: U.square().sum(1)), int((~keep).sum())


def _projected(model, task, pair, opts, name):
    Phi = project_model(model, task, pair[0], pair[1], k=opts.proj_dim, seed=opts.seed, wrt="output",
                        kind=opts.kind, max_memory=opts.max_memory, backend=opts.backend)
    if not all_finite(Phi):  # the QR / SVD path would turn Inf into zeros
        raise ValueError(f"trak: non-finite projected {name} gradients; check the model and data")
    return Phi


def _train_side(model, task, train, opts):
    """Φ of the training set, its pseudo-inverse (:func:`pinv`) and −φ′ per training point."""
    Phi = _projected(model, task, train, opts, "training")
    if not bool(Phi.any()):
        raise ValueError("trak: the projected training gradients are all zero (Φ = 0); nothing to attribute")
    _, d1, _ = outputs(model, task, train)
    return Phi.dtype, pinv(Phi.double(), rank_cut(Phi.dtype)), -d1.double()


def trak(model, task, train, test, opts):
    dtype, (solve, _, dropped), weight = _train_side(model, task, train, opts)
    scores = solve(_projected(model, task, test, opts, "test").double().T) * weight[:, None]
    return scores.to(dtype), {"dropped": dropped, "proj_dim": opts.proj_dim}


def trak_self(model, task, train, opts):
    """score(i, i) = −φ′_i · φ_iᵀ (ΦᵀΦ)⁺ φ_i: the leverages of Φ's rows, O(n·k) memory."""
    dtype, (_, hat, dropped), weight = _train_side(model, task, train, opts)
    return (hat() * weight).to(dtype), {"dropped": dropped, "proj_dim": opts.proj_dim}
