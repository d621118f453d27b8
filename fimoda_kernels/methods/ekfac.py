"""EK-FAC influence (MATH.md §3, §6): score(z, i) = g_zᵀ (G_EKFAC + λI)^{-1} g_i, fitted on the
training set and scored in factored form by :class:`fimoda_kernels.EKFAC`."""
from __future__ import annotations

import dataclasses

from .._validate import check_choice, check_float, check_int
from ._common import Options

CURVATURES = ("gn", "empirical", "sampled")
STRATEGIES = ("ekfac", "kfac")


@dataclasses.dataclass
class EKFACOptions(Options):
    """Attributes:
        curvature: "gn" (default), "empirical" or "sampled" (see :class:`fimoda_kernels.EKFAC`).
        strategy: "ekfac" (eigenvalue-corrected, default) or "kfac".
        damping: λ; None = 0.1 × mean(Λ) per layer (kronfluence's heuristic).
        batch_size: samples per factor-accumulation batch.
    """
    curvature: str = "gn"
    strategy: str = "ekfac"
    damping: float | None = None
    batch_size: int = 128

    def validate(self):
        super().validate()
        self.curvature = check_choice("curvature", self.curvature, CURVATURES)
        self.strategy = check_choice("strategy", self.strategy, STRATEGIES)
        if self.damping is not None:
            self.damping = check_float("damping", self.damping, min_value=0.0)
        self.batch_size = check_int("batch_size", self.batch_size, min_value=1)
        return self


def ekfac(model, task, train, test, opts):
    from ..ekfac import EKFAC

    est = EKFAC(model, task, curvature=opts.curvature, strategy=opts.strategy, damping=opts.damping)
    est.fit(train[0], train[1], batch_size=opts.batch_size)
    scores = est.scores(train[0], train[1], test[0], test[1])
    return scores, {"curvature": opts.curvature, "strategy": opts.strategy}
