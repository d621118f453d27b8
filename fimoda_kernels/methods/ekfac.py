"""EK-FAC influence (MATH.md §3, §6): score(z, i) = g_zᵀ (G_EKFAC + λI)^{-1} g_i, fitted on the
training set and scored in factored form by :class:`fimoda_kernels.EKFAC`.

Factors, eigenvalues and scores are computed in the model's parameter dtype (float32 for float16 /
bfloat16 models, EKFAC's lowest accumulation dtype); ``backend`` selects EKFAC's kernels and
``max_memory`` caps the (a, s) cache of the fit's first pass (``EKFAC.fit``'s ``cache_bytes``;
beyond it the eigenvalue-correction pass reads the training data again).
"""
from __future__ import annotations

import dataclasses

import torch

from .._validate import check_choice, check_float, check_int, check_seed
from ._common import Options, flat_params, self_chunks

CURVATURES = ("gn", "empirical", "sampled")
STRATEGIES = ("ekfac", "kfac")


@dataclasses.dataclass
class EKFACOptions(Options):
    """Attributes:
        curvature: "gn" (default), "empirical" or "sampled" (see :class:`fimoda_kernels.EKFAC`).
        strategy: "ekfac" (eigenvalue-corrected, default) or "kfac".
        damping: λ; None = 0.1 × mean(Λ) per layer (kronfluence's heuristic).
        batch_size: samples per factor-accumulation batch.
        seed: the label-sampling generator's seed for ``curvature="sampled"``.
    """
    curvature: str = "gn"
    strategy: str = "ekfac"
    damping: float | None = None
    batch_size: int = 128
    seed: int = 0

    def validate(self):
        super().validate()
        self.curvature = check_choice("curvature", self.curvature, CURVATURES)
        self.strategy = check_choice("strategy", self.strategy, STRATEGIES)
        if self.damping is not None:
            self.damping = check_float("damping", self.damping, min_value=0.0)
        self.batch_size = check_int("batch_size", self.batch_size, min_value=1)
        self.seed = check_seed("seed", self.seed)
        return self


def _fitted(model, task, train, opts):
    from ..ekfac import EKFAC

    # EKFAC's dtype defaults to float32; a float64 model must get float64 scores like every other method
    dtype = torch.float64 if flat_params(model)[0].dtype == torch.float64 else torch.float32
    est = EKFAC(model, task, curvature=opts.curvature, strategy=opts.strategy, damping=opts.damping,
                seed=opts.seed, dtype=dtype, backend=opts.backend)
    return est.fit(train[0], train[1], batch_size=opts.batch_size, cache_bytes=opts.max_memory)


def _info(est, opts) -> dict:
    """The settings, and the λ each layer used (the 0.1·mean(Λ) heuristic resolves one per layer)."""
    return {"curvature": opts.curvature, "strategy": opts.strategy,
            "damping": {name or "model": float(lam) for name, lam in zip(est.layer_names, est.damping_values)}}


def ekfac(model, task, train, test, opts):
    est = _fitted(model, task, train, opts)
    return est.scores(train[0], train[1], test[0], test[1]), _info(est, opts)


def ekfac_self(model, task, train, opts):
    """score(i, i): one fit, then each training chunk scored against itself (:func:`self_chunks`;
    its preconditioned gradients and the chunk's c × c scores, about 3·c·p values)."""
    est = _fitted(model, task, train, opts)
    x, y = train
    p = sum(t.numel() for t in flat_params(model))
    out = self_chunks(x.shape[0], opts.max_memory, 3 * p * est.dtype.itemsize,
                      lambda i, j: est.scores(x[i:j], y[i:j], x[i:j], y[i:j], batch_size=opts.batch_size).diagonal())
    return out, _info(est, opts)
