"""How well an attribution method approximates the further-training gold standard (MATH.md §10).

Shapes follow the study: gold scores ``gold[t, z, i]`` (evaluation point t, test point z, LOO
point i ∈ S) and a method's scores ``scores[i, z]`` (rows = the LOO training points, as
``attribute`` returns them, restricted to S). All results are float64 numpy arrays.

A similarity is undefined (NaN) where either vector is constant (Spearman) or zero (cosine) —
e.g. the gold at t = 0, which is exactly zero under the mean adjustment. Curves therefore leave
out t = 0, and the aggregates count only defined values and report how many (``n``). NaN is kept for
these cases alone: non-finite gold or scores are rejected, not counted as undefined.
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
from scipy import stats

__all__ = ["cosine_similarity", "spearman", "mean_sem", "similarity_curves", "peak", "divisors",
           "seed_count_study", "mislabel_auc"]


def cosine_similarity(a, b) -> np.ndarray:
    """Cosine between ``a`` and ``b`` along the last axis (broadcast over the others); NaN where
    either vector is all zero."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    na, nb = np.linalg.norm(a, axis=-1), np.linalg.norm(b, axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = (a * b).sum(-1) / (na * nb)
    return np.where((na > 0) & (nb > 0), out, np.nan)


def spearman(a, b) -> np.ndarray:
    """Spearman's ρ along the last axis (Pearson correlation of the average ranks, as
    ``scipy.stats.spearmanr``); NaN where either vector is constant."""
    a, b = np.broadcast_arrays(np.asarray(a, np.float64), np.asarray(b, np.float64))
    ra, rb = stats.rankdata(a, axis=-1), stats.rankdata(b, axis=-1)
    ra -= ra.mean(-1, keepdims=True)
    rb -= rb.mean(-1, keepdims=True)
    return cosine_similarity(ra, rb)


def mean_sem(values, axis=-1) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean, standard error of the mean (sample std with ddof = 1, over √n, as ``scipy.stats.sem``)
    and count n of the non-NaN entries along ``axis``; mean NaN where n = 0, sem NaN where n < 2."""
    v = np.asarray(values, np.float64)
    ok = ~np.isnan(v)
    n = ok.sum(axis)
    s = np.where(ok, v, 0.0).sum(axis)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(n > 0, s / n, np.nan)
        dev = np.where(ok, v - np.expand_dims(mean, axis), 0.0)
        var = (dev ** 2).sum(axis) / (n - 1)
        sem = np.where(n > 1, np.sqrt(var / n), np.nan)
    return mean, sem, n


def _finite(name: str, values) -> np.ndarray:
    """``values`` as float64, rejecting NaN / Inf (a NaN result would pass for an undefined similarity)."""
    a = np.asarray(values, np.float64)
    if not np.isfinite(a).all():
        first = tuple(np.argwhere(~np.isfinite(a))[0].tolist())
        raise ValueError(f"{name}: expected finite values, got NaN or Inf (first at index {first})")
    return a


def _nonzero_t(eval_points) -> np.ndarray:
    return np.asarray(eval_points) != 0


def similarity_curves(gold, scores, eval_points, spearman_too: bool = True) -> dict:
    """Per-test-point cosine and Spearman between ``gold[t, z, :]`` and ``scores[:, z]`` for every
    evaluation point t ≠ 0, with mean ± SEM over test points. Returns a dict of arrays:
    ``eval_points [E]``, ``cosine``/``spearman [E, Z]``, ``cosine_mean``/``cosine_sem``/``cosine_n``,
    ``spearman_mean``/``spearman_sem``/``spearman_n`` ``[E]`` (the Spearman entries only with
    ``spearman_too``: ranking is the expensive part)."""
    gold = _finite("gold", gold)
    scores = _finite("scores", scores)
    if gold.ndim != 3 or scores.shape != (gold.shape[2], gold.shape[1]):
        raise ValueError(f"gold [n_evals, n_test, n_loo] and scores [n_loo, n_test] do not match: "
                         f"got {gold.shape} and {scores.shape}")
    eval_points = np.asarray(eval_points)
    if eval_points.shape != gold.shape[:1]:
        raise ValueError(f"eval_points: expected {gold.shape[0]} values (one per evaluation, gold.shape[0]), "
                         f"got shape {eval_points.shape}")
    keep = _nonzero_t(eval_points)
    g = gold[keep]
    a = scores.T[None]  # [1, Z, S]
    out = {"eval_points": eval_points[keep]}
    for name, fn in (("cosine", cosine_similarity), ("spearman", spearman))[:2 if spearman_too else 1]:
        v = fn(g, a)
        out[name] = v
        out[f"{name}_mean"], out[f"{name}_sem"], out[f"{name}_n"] = mean_sem(v, axis=1)
    return out


def peak(mean, sem, eval_points) -> dict:
    """The maximum of a mean curve, its SEM and where it occurs (NaN entries ignored)."""
    mean = np.asarray(mean, np.float64)
    if mean.size == 0 or np.all(np.isnan(mean)):
        return {"value": float("nan"), "sem": float("nan"), "at": None}
    k = int(np.nanargmax(mean))
    at = np.asarray(eval_points)[k]
    return {"value": float(mean[k]), "sem": float(np.asarray(sem)[k]), "at": at.item()}


def divisors(n: int) -> list[int]:
    return [r for r in range(1, n + 1) if n % r == 0]


def seed_count_study(gold_for_seeds: Callable[[Sequence[int]], np.ndarray], n_seeds: int, scores,
                     eval_points, group_sizes: Sequence[int] | None = None) -> list[dict]:
    """Peak cosine vs the number of seeds averaged (MATH.md §10, paper Fig. 3 / App. E.1).

    For each group size r (default: every divisor of ``n_seeds``), the seeds (axis indices
    0..n_seeds−1) are split into n_seeds/r consecutive groups of r; ``gold_for_seeds(group)`` gives
    the gold ``[n_evals, n_test, n_loo]`` averaged over that group; the cosine with ``scores`` per
    group and test point is averaged over groups × test points at each t ≠ 0, and the maximum
    over t is reported with its SEM (over groups × test points) and where it occurs."""
    rows = []
    for r in (divisors(n_seeds) if group_sizes is None else group_sizes):
        if n_seeds % r:
            raise ValueError(f"group_sizes: {r} does not divide n_seeds = {n_seeds}")
        cos = [similarity_curves(gold_for_seeds(list(range(s, s + r))), scores, eval_points, False)["cosine"]
               for s in range(0, n_seeds, r)]  # each [E, Z]
        stacked = np.concatenate(cos, axis=1)  # [E, groups · Z]
        mean, sem, _ = mean_sem(stacked, axis=1)
        pk = peak(mean, sem, np.asarray(eval_points)[_nonzero_t(eval_points)])
        rows.append({"n_seeds": r, "n_groups": n_seeds // r, "peak": pk["value"], "sem": pk["sem"], "at": pk["at"]})
    return rows


def mislabel_auc(self_scores, flipped) -> float:
    """AUC-ROC of self-influence scores (higher = more suspicious) against the flip indicator."""
    from sklearn.metrics import roc_auc_score

    flipped = np.asarray(flipped, bool)
    s = np.asarray(self_scores, np.float64)
    if s.ndim != 1 or flipped.shape != s.shape:
        raise ValueError(f"self_scores and flipped: expected one flag per score (1-D, one length), got shapes "
                         f"{s.shape} and {flipped.shape}")
    s = _finite("self_scores", s)
    if flipped.all() or not flipped.any():
        raise ValueError("flipped: expected both flipped and clean points")
    return float(roc_auc_score(flipped, s))
