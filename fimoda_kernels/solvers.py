"""Inverse-HVP solvers for many right-hand sides at once (MATH.md §5): LiSSA and conjugate gradients.

Both take an operator ``hvp`` (an :class:`~fimoda_kernels.hvp.HVPOperator` from :func:`gn_hvp` /
:func:`hessian_hvp`, or any callable ``hvp(V [r, p], batch=None | indices) -> [r, p]`` with
``num_params`` and ``num_samples`` attributes) and right-hand sides ``v``:

- ``v [r, p]`` → result ``[r, p]``; ``v [p]`` is solved as r = 1 and returned as ``[p]``;
- the vector arithmetic runs in v's dtype (float32 or float64); the operator converts to and from
  its own dtype (float64 v with a float64 model is float64 throughout).

All r recursions share each operator call: one batched HVP per iteration instead of r.
"""
from __future__ import annotations

import math
import warnings

import torch

from ._validate import all_finite, check_float, check_input, check_int, check_seed
from .hvp import HVPOperator
from .ops.lissa_update import lissa_update

__all__ = ["lissa", "cg", "extreme_eigenvalues", "LiSSADivergedError", "CGNotConvergedWarning", "CGBreakdownError",
           "LISSA_SCALES", "lissa_scale_ladder"]

# The paper's ladder {10, 20, 50, 100, 200, 500}, continued 1-2-5 per decade up to the maximum.
LISSA_SCALES = (10.0, 20.0, 50.0, 100.0, 200.0, 500.0)
_MAX_AUTO_SCALE = 1e7


def lissa_scale_ladder(max_scale: float = _MAX_AUTO_SCALE) -> list[float]:
    """10, 20, 50, 100, 200, 500, 1000, 2000, 5000, ... (1-2-5 per decade) up to ``max_scale``."""
    out, decade = [], 10.0
    while True:
        for m in (1.0, 2.0, 5.0):
            if m * decade > max_scale * (1 + 1e-12):
                return out
            out.append(m * decade)
        decade *= 10.0


class LiSSADivergedError(RuntimeError):
    """The LiSSA recursion diverged: some row's iterate became non-finite or exceeded
    ``kappa · ‖v_row‖ · scale``. Attributes: ``iteration`` (1-based depth step), ``repeat`` (0-based),
    ``scale``, ``norms`` (‖h_k‖ per row, float64 CPU tensor), ``threshold`` (per row), ``rows``
    (indices of the offending rows) and, for ``scale="auto"``, ``tried`` (every (scale, iteration))."""

    def __init__(self, message: str, *, iteration: int, repeat: int, scale: float, norms: torch.Tensor,
                 threshold: torch.Tensor, rows: torch.Tensor, tried: list | None = None):
        super().__init__(message)
        self.iteration, self.repeat, self.scale = iteration, repeat, scale
        self.norms, self.threshold, self.rows = norms, threshold, rows
        self.tried = tried or [(scale, iteration)]


class CGNotConvergedWarning(RuntimeWarning):
    """Some right-hand sides did not reach ``tol`` within ``max_iter`` CG iterations."""


class CGBreakdownError(RuntimeError):
    """CG met pᵀ(M + λI)p ≤ 0 or a non-finite value: the damped operator is not positive definite
    (e.g. a true Hessian with negative curvature and too little damping)."""


def _check_operator(hvp) -> tuple[int, int]:
    if not callable(hvp):
        raise TypeError(f"hvp: expected an operator from gn_hvp/hessian_hvp (callable), got {type(hvp).__name__}")
    for attr in ("num_params", "num_samples"):
        if not isinstance(getattr(hvp, attr, None), int):
            raise TypeError(f"hvp: expected an operator with an integer {attr!r} attribute "
                            f"(gn_hvp/hessian_hvp), got {type(hvp).__name__}")
    return hvp.num_params, hvp.num_samples


def _unit_rhs(V: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of V divided by their largest magnitude (an entry of V: exact, never over- or underflows),
    and those to scale the solutions back by (the solvers are linear in v): a float32 gradient of
    norm 1e-20 (a confidently classified point) squares to a subnormal or 0, which broke CG
    (pᵀAp = 0) and LiSSA's divergence threshold (κ·‖v‖·s = 0). Zero rows stay zero."""
    peak = torch.linalg.vector_norm(V, ord=float("inf"), dim=1)  # max |v_i|, no [r, p] temporary
    scale = torch.where(peak > 0, peak, torch.ones_like(peak))
    return V / scale[:, None], scale


def _scaled_back(x: torch.Tensor, scale: torch.Tensor, solver: str) -> torch.Tensor:
    x.mul_(scale[:, None])
    if not all_finite(x):
        raise ValueError(f"v: {solver}'s solution overflows {x.dtype} (the right-hand side is too large for "
                         "this dtype); scale it down or solve in float64")
    return x


def _check_rhs(v, p: int, hvp) -> tuple[torch.Tensor, bool]:
    """v as a contiguous [r, p] float32/float64 block, and whether it came as [p]."""
    check_input("v", v, ndim=(1, 2), dtypes=(torch.float32, torch.float64), finite=True)
    if v.shape[-1] != p:
        raise ValueError(f"v: expected [r, {p}] or [{p}] (p = hvp.num_params), got {tuple(v.shape)}")
    device = getattr(hvp, "device", None)
    if device is not None and v.device != torch.device(device):
        raise ValueError(f"v: expected a tensor on {device} (the operator's device), got one on {v.device}")
    one = v.dim() == 1
    return (v[None] if one else v).contiguous(), one


# ----------------------------------------------------------------------------- LiSSA

def extreme_eigenvalues(hvp, steps: int = 40, seed: int = 0) -> tuple[float, float]:
    """Lanczos estimates (θ_min, θ_max) of the extreme eigenvalues of the operator's full-data matrix M
    (``steps`` products with one vector, full reorthogonalization, float64, a seeded start). They are
    Rayleigh quotients, so λ_min(M) ≤ θ_min and θ_max ≤ λ_max(M): a bound derived from them is never
    a false alarm."""
    p, _ = _check_operator(hvp)
    steps = min(check_int("steps", steps, min_value=1), p)
    seed = check_seed("seed", seed)
    device = getattr(hvp, "device", None) or "cpu"
    q = torch.randn(p, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(device)
    q /= q.norm()
    Q = torch.empty(steps, p, dtype=torch.float64, device=device)
    alpha, beta = [], []
    for j in range(steps):
        Q[j] = q
        w = hvp(q[None], batch=None).to(torch.float64)[0]
        if not all_finite(w):
            raise ValueError("hvp: the operator returned non-finite values (Lanczos spectrum estimate)")
        alpha.append(float(w @ q))
        for _ in range(2):  # full reorthogonalization, twice ("twice is enough")
            w -= Q[:j + 1].T @ (Q[:j + 1] @ w)
        b = float(w.norm())
        if j == steps - 1 or b <= 1e-12 * max(abs(a) for a in alpha):  # done, or an invariant subspace
            break
        beta.append(b)
        q = w / b
    T = torch.diag(torch.tensor(alpha, dtype=torch.float64))
    if beta:
        off = torch.tensor(beta, dtype=torch.float64)
        T += torch.diag(off, 1) + torch.diag(off, -1)
    ev = torch.linalg.eigvalsh(T)
    return float(ev[0]), float(ev[-1])


def lissa(hvp, v: torch.Tensor, depth: int, scale, damping: float, repeat: int = 1,
          batch_size: int | None = 128, seed: int = 0, *, absolute_damping: bool = False,
          kappa: float = 1e3, max_growth: float | None = 10.0, max_scale: float = _MAX_AUTO_SCALE,
          return_info: bool = False, backend: str | None = None):
    """LiSSA inverse-HVPs of r vectors at once (MATH.md §5, torch-influence's recursion).

    For every row of v: h₀ = v; h_k = v + (1 − d)·h_{k−1} − M_{b_k} h_{k−1} / s for k = 1..depth; the
    result is the mean over ``repeat`` independent recursions of h_depth / s. Its fixed point is
    (M + d·s·I)^{-1} v: the effective damping is λ = d·s. Each step draws one minibatch b_k, shared by
    all r rows: ``batch_size`` indices uniformly with replacement (as torch-influence's
    ``RandomSampler(replacement=True)``) from ``torch.Generator().manual_seed(seed)``; the repeats
    continue the same stream. ``batch_size=None`` (or ≥ N) uses the full data every step
    (deterministic). Row i's result does not depend on the other rows (batched == one at a time).

    Args:
        hvp: operator (:func:`gn_hvp` / :func:`hessian_hvp`).
        v: ``[r, p]`` or ``[p]`` (returned as ``[p]``), float32/float64, finite.
        depth: D ≥ 1. repeat: ≥ 1.
        scale: s > 0, or ``"auto"``: the smallest value of :func:`lissa_scale_ladder` (10, 20, 50, 100,
            200, 500, 1000, 2000, 5000, ...) up to ``max_scale`` (default 1e7) for which the whole run does
            not diverge — each rung is a full run with the same minibatches (rungs that fail the spectral
            check below, or with d = λ/s ≥ 2, are skipped without running); if every rung diverges,
            LiSSADivergedError says so. The recursion converges when s exceeds λ_max(M_b)/(2 − d).
        damping: d with 0 ≤ d < 2 (MATH.md §5's d; λ = d·s). With ``absolute_damping=True`` it is λ
            itself (torch-influence's ``damp``: the step adds λ·h to M h), i.e. d = λ/s for whichever
            scale runs, so the fixed point (M + λI)^{-1} v does not move with the scale.
        kappa: divergence threshold: a row diverges when ‖h_k‖ is non-finite or exceeds
            kappa·‖v_row‖·s. A non-expanding recursion has ‖h_k‖ ≤ k‖v‖, so the default 1000 (with
            s ≥ 10) cannot flag a convergent run of depth ≤ 10⁴ while a divergent one grows geometrically.
            Checked at every step from the norms the fused update returns (no extra pass).
        max_growth: the spectral check, before a scale runs (None: off). A slow divergence never reaches
            the κ bound: one step multiplies an eigendirection of M (eigenvalue μ) by 1 − d − μ/s, and
            a factor just past ±1 (s just under (μ_max + λ)/2, or a true Hessian with μ_min + λ < 0,
            which no scale fixes) grows it only ρ^D-fold over the run while the result is wrong by that
            factor. So θ_min, θ_max of M are estimated first (:func:`extreme_eigenvalues`: 40 full-data
            products with one vector), and a scale is refused (LiSSADivergedError at iteration 0) when its
            factor f = 1 − d − θ/s at either end gives f^depth > max_growth (f ≥ 0), or, for f < 0 (an
            alternating direction must converge, not merely stay bounded), |f|^depth above both
            1/max_growth and the slowest converging (0 ≤ f < 1) direction's. The check sees the
            full-data M, not the minibatch ones (those stay the κ check's). Its cost, ≈ 40·N/batch_size minibatch products
            with one vector, is small against the run's depth products with r vectors unless r is 1
            and N large: then max_growth=None skips it.
        return_info: also return a dict: ``scale`` (the one used), ``damping`` (d), ``effective_damping``
            (d·s), ``tried`` ([(scale, iteration it diverged at)] of the rejected rungs; 0: the spectral
            check), ``depth``, ``repeat``, ``batch_size``, ``seed``, ``final_norms`` (‖h_D‖ per row, last
            repeat), ``spectrum`` ((θ_min, θ_max) or None) and ``growth`` (ρ^depth at the scale used).
        backend: of the fused update :func:`~fimoda_kernels.ops.lissa_update.lissa_update`.

    Returns ``[r, p]`` (or ``[p]``) in v's dtype, or ``(result, info)`` with ``return_info``.
    Raises LiSSADivergedError (with the iteration and the norms) instead of returning a diverged result.
    """
    p, n = _check_operator(hvp)
    V, one = _check_rhs(v, p, hvp)
    depth = check_int("depth", depth, min_value=1)
    repeat = check_int("repeat", repeat, min_value=1)
    seed = check_seed("seed", seed)
    if batch_size is not None:
        batch_size = check_int("batch_size", batch_size, min_value=1)
    if not isinstance(absolute_damping, bool):
        raise TypeError(f"absolute_damping: expected a bool, got {type(absolute_damping).__name__}")
    damping = check_float("damping", damping, min_value=0.0)
    if not absolute_damping and damping >= 2:
        raise ValueError(f"damping: expected 0 <= d < 2 (the recursion's factor 1 - d must lie in (-1, 1]), "
                         f"got {damping}")
    kappa = check_float("kappa", kappa, positive=True)
    if max_growth is not None:
        max_growth = check_float("max_growth", max_growth, min_value=1.0)
    max_scale = check_float("max_scale", max_scale, positive=True)
    if isinstance(scale, str):
        if scale != "auto":
            raise ValueError(f"scale: expected a number > 0 or 'auto', got {scale!r}")
        ladder = lissa_scale_ladder(max_scale)
        if not ladder:
            raise ValueError(f"max_scale: expected at least the first rung 10, got {max_scale}")
        if absolute_damping:  # d = λ/s must stay below 2: start above λ/2
            ladder = [s for s in ladder if damping / s < 2]
            if not ladder:
                raise ValueError(f"damping: λ = {damping} needs a scale > λ/2 = {damping / 2:g}, beyond "
                                 f"max_scale={max_scale:g}")
    else:
        ladder = [check_float("scale", scale, positive=True)]
        d_fixed = damping / ladder[0] if absolute_damping else damping
        if d_fixed >= 2:  # before the spectrum's cost
            raise ValueError(f"damping: λ/s = {damping}/{ladder[0]} = {d_fixed} >= 2; use a larger scale")
    full = batch_size is None or batch_size >= n
    V, row_scale = _unit_rhs(V)
    v_norm = torch.linalg.vector_norm(V, dim=1, dtype=torch.float64)
    back = row_scale.double()  # norms in the caller's units, for errors and info
    spectrum = extreme_eigenvalues(hvp, seed=seed) if max_growth is not None else None

    def power(f: float) -> float:
        return math.exp(min(depth * math.log(abs(f)), 700.0)) if f else 0.0

    def growth(s: float, d: float) -> float:
        """ρ^depth: how much the worst eigendirection of the full-data M grows over the run."""
        return max(power(1 - d - t / s) for t in spectrum)

    def unsound(s: float, d: float) -> bool:
        """A monotone direction (factor f = 1 − d − θ/s ≥ 0) may grow up to max_growth (f > 1 only from
        negative curvature: a truncated series). An alternating one (f < 0: s too small for θ_max) must
        also converge, to 1/max_growth of its error or as far as the slowest converging monotone
        direction does (no worse than LiSSA's usual truncation; a growing one, from negative curvature,
        is no excuse): at f = −1.0004 it neither grows much nor converges, and the result was 100% off
        along the top eigendirection."""
        fs = [1 - d - t / s for t in spectrum]
        slowest = max([power(f) for f in fs if 0 <= f < 1], default=0.0)  # converging ones only
        return any(power(f) > (max_growth if f >= 0 else max(1 / max_growth, slowest)) for f in fs)

    def run(s: float):
        d = damping / s if absolute_damping else damping
        if d >= 2:
            raise ValueError(f"damping: λ/s = {damping}/{s} = {d} >= 2; use a larger scale")
        threshold = kappa * v_norm * s
        if spectrum is not None and unsound(s, d):
            lo, hi = spectrum
            mu = lo + d * s  # the damped operator's lowest Rayleigh quotient
            f_lo, f_hi = 1 - d - lo / s, 1 - d - hi / s
            if f_lo > 1 and power(f_lo) > max_growth and f_lo >= abs(f_hi):  # negative curvature grows fastest
                need = -mu / math.expm1(math.log(max_growth) / depth)  # (1 + |μ|/s)^depth = max_growth
                why = (f"the damped operator has negative curvature (θ_min + λ = {mu:.4g} < 0), which LiSSA "
                       f"cannot invert: each step grows it by 1 + {-mu:.4g}/s; keeping that under max_growth "
                       f"over the depth needs s ≥ {need:.4g} (a truncated series there), or raise the damping")
            else:
                why = (f"the top factor 1 − d − θ_max/s = {f_hi:.6g} alternates in sign and does not decay "
                       f"({depth} steps leave {power(f_hi):.4g} of it, more than 1/max_growth and than the slowest "
                       f"monotone direction keeps): the scale is below (θ_max + λ)/2 = {(hi + d * s) / 2:.4g} or "
                       f"too close above it; use a larger scale")
            raise LiSSADivergedError(
                f"LiSSA does not converge with scale={s:g}, d={d:g} (spectral check before running): the full-data "
                f"M has Rayleigh quotients θ in [{lo:.4g}, {hi:.4g}], so one step multiplies an "
                f"eigendirection by up to {max(abs(1 - d - t / s) for t in spectrum):.6g} and {depth} steps "
                f"by {growth(s, d):.4g}; {why}",
                iteration=0, repeat=0, scale=s, norms=torch.full_like(v_norm, float("nan")).cpu(),
                threshold=(threshold * back).cpu(), rows=torch.arange(V.shape[0]))
        gen = torch.Generator().manual_seed(seed)
        total = torch.zeros_like(V)
        # our operators write into a buffer: the loop then allocates nothing per step
        mh_buf = torch.empty_like(V) if isinstance(hvp, HVPOperator) else None
        for rep in range(repeat):
            h = V.clone()
            for k in range(1, depth + 1):
                batch = None if full else torch.randint(n, (batch_size,), generator=gen)
                mh = hvp(h, batch=batch, out=mh_buf) if mh_buf is not None else hvp(h, batch=batch).to(V.dtype)
                if mh.requires_grad and torch.is_grad_enabled():  # lissa_update would name its own argument
                    raise ValueError("hvp: expected products that do not require grad (LiSSA is not differentiable), "
                                     "got ones that do; call it under torch.no_grad()")
                h, sq = lissa_update(h, V, mh, s, d, out=h, backend=backend)
                norms = sq.double().sqrt()
                bad = ~torch.isfinite(norms) | (norms > threshold)
                if bool(bad.any()):
                    rows, nrm, thr = bad.nonzero().flatten().cpu(), (norms * back).cpu(), (threshold * back).cpu()
                    raise LiSSADivergedError(
                        f"LiSSA diverged at iteration {k} of {depth} (repeat {rep}) with scale={s:g}, "
                        f"d={d:g}: ‖h‖ of row(s) {rows[:8].tolist()} = {nrm[rows[:8]].tolist()} "
                        f"exceeds kappa·‖v‖·s = {thr[rows[:8]].tolist()} or is not finite; "
                        "use a larger scale (it must exceed λ_max(M_b)/(2 − d)) or scale='auto'",
                        iteration=k, repeat=rep, scale=s, norms=nrm, threshold=thr, rows=rows)
            total.add_(h, alpha=1 / s)  # in place: no [r, p] temporaries
        return total.div_(repeat), d, norms

    tried = []
    for s in ladder:
        try:
            x, d, norms = run(s)
        except LiSSADivergedError as exc:
            if len(ladder) == 1:
                raise
            tried.append((s, exc.iteration))
            last = exc
            continue
        out = _scaled_back(x, row_scale, "LiSSA")
        out = out[0] if one else out
        if not return_info:
            return out
        return out, dict(scale=s, damping=d, effective_damping=d * s, tried=tried, depth=depth, repeat=repeat,
                         batch_size=None if full else batch_size, seed=seed,
                         final_norms=(norms * back).cpu(),
                         spectrum=spectrum, growth=None if spectrum is None else growth(s, d))
    raise LiSSADivergedError(
        f"scale='auto': LiSSA diverged for every scale of the ladder up to max_scale={max_scale:g} "
        f"(tried {[t[0] for t in tried]}); the last: {last}", iteration=last.iteration, repeat=last.repeat,
        scale=last.scale, norms=last.norms, threshold=last.threshold, rows=last.rows, tried=tried)


# ----------------------------------------------------------------------------- CG

def cg(hvp, v: torch.Tensor, damping: float, tol: float = 1e-5, max_iter: int | None = None):
    """Solve (M + damping·I) x = v by conjugate gradients for every row of v (MATH.md §5), with
    full-data HVPs. The r recursions are independent (each row its own α, β) and share one batched
    operator call per iteration; a row stops (is frozen) once ‖r_k‖ ≤ tol·‖v_row‖, and later calls
    carry only the rows still running.

    Args:
        hvp: operator (:func:`gn_hvp` / :func:`hessian_hvp`); its full-data matrix M is used.
        v: ``[r, p]`` or ``[p]`` (returned as ``[p]``), float32/float64, finite.
        damping: λ ≥ 0. tol: relative residual target > 0 (default 1e-5, scipy's ``rtol``).
        max_iter: ≥ 1; default p (exact-arithmetic CG needs at most p steps).

    Returns ``(x, info)``: x in v's dtype; ``info`` = dict(``iterations`` (Tensor[r] int64),
    ``converged`` (Tensor[r] bool), ``residuals`` (Tensor[k + 1, r]: the recursive relative residual
    ‖r_j‖/‖v‖ of every row after each iteration j, constant once a row is frozen), ``final_residual``
    (Tensor[r]: ‖v − (M + λI)x‖/‖v‖ recomputed with one more operator call), ``tol``, ``damping``,
    ``max_iter``). A zero row of v gives x = 0, converged at iteration 0.

    Rows still above ``tol`` after ``max_iter`` iterations: a :class:`CGNotConvergedWarning` (naming
    them and their residuals) is issued and their last iterate is returned, marked
    ``converged=False`` — check ``info["converged"]``. Raises :class:`CGBreakdownError` when pᵀ(M+λI)p ≤ 0
    or a value is not finite (the damped operator is not positive definite).
    """
    p, _ = _check_operator(hvp)
    V, one = _check_rhs(v, p, hvp)
    damping = check_float("damping", damping, min_value=0.0)
    tol = check_float("tol", tol, positive=True)
    max_iter = p if max_iter is None else check_int("max_iter", max_iter, min_value=1)
    V, row_scale = _unit_rhs(V)

    def apply(P):
        return hvp(P).to(V.dtype).add_(P, alpha=damping)

    r = V.shape[0]
    x = torch.zeros_like(V)
    res = V.clone()
    direction = V.clone()
    rr = (res * res).sum(1)
    v_norm = rr.sqrt()
    safe = torch.where(v_norm > 0, v_norm, torch.ones_like(v_norm))
    converged = rr.sqrt() <= tol * v_norm
    iterations = torch.zeros(r, dtype=torch.int64)
    history = [(rr.sqrt() / safe).cpu()]
    for _ in range(max_iter):
        active = (~converged).nonzero().flatten()
        if active.numel() == 0:
            break
        all_rows = active.numel() == r
        P = direction if all_rows else direction[active]
        AP = apply(P)
        pAp = (P * AP).sum(1)
        rr_a = rr if all_rows else rr[active]
        if not all_finite(pAp) or bool((pAp <= 0).any()):
            raise CGBreakdownError(
                f"cg: pᵀ(M + λI)p = {pAp.min().item():.3g} (not > 0 and finite; right-hand sides scaled to a "
                f"largest entry of 1) at iteration {int(iterations.max()) + 1}: the damped operator is not "
                "positive definite; "
                "raise damping or use the GN operator")
        alpha = (rr_a / pAp)[:, None]
        if all_rows:  # in place, no [r, p] temporaries
            x.addcmul_(alpha, P)
            res.addcmul_(alpha, AP, value=-1)
            rr_new = (res * res).sum(1)
            direction.mul_((rr_new / rr_a)[:, None]).add_(res)
            rr = rr_new
        else:
            x[active] += alpha * P
            res_a = res[active] - alpha * AP
            res[active] = res_a
            rr_new = (res_a * res_a).sum(1)
            direction[active] = res_a + (rr_new / rr_a)[:, None] * P
            rr[active] = rr_new
        if not all_finite(rr_new):
            raise CGBreakdownError("cg: the residual became non-finite; the operator or damping is unusable")
        iterations[active.cpu()] += 1
        converged[active] = rr_new.sqrt() <= tol * v_norm[active]
        history.append((rr.sqrt() / safe).cpu())
    final = torch.linalg.vector_norm(apply(x).sub_(V), dim=1) / safe
    conv = converged.cpu()
    if not bool(conv.all()):
        bad = (~conv).nonzero().flatten()
        warnings.warn(f"cg: {bad.numel()} of {r} right-hand sides did not reach tol={tol:g} in max_iter={max_iter} "
                      f"iterations (rows {bad[:8].tolist()}, relative residuals "
                      f"{[round(float(history[-1][i]), 6) for i in bad[:8]]}); their last iterates are "
                      "returned with info['converged'] False", CGNotConvergedWarning, stacklevel=2)
    info = dict(iterations=iterations, converged=conv, residuals=torch.stack(history), final_residual=final.cpu(),
                tol=tol, damping=damping, max_iter=max_iter)
    x = _scaled_back(x, row_scale, "CG")
    return (x[0] if one else x), info
