"""Study metrics (MATH.md §10) against scipy / scikit-learn called directly."""
import numpy as np
import pytest
from scipy import stats
from scipy.spatial import distance
from sklearn.metrics import roc_auc_score

from fimoda_kernels import metrics


def _rng(seed=0):
    return np.random.default_rng(seed)


def test_cosine_matches_scipy_with_broadcast():
    rng = _rng()
    a = rng.normal(size=(3, 4, 7)) + 0.2
    b = rng.normal(size=(4, 7)) - 0.1
    got = metrics.cosine_similarity(a, b[None])
    assert got.shape == (3, 4)
    for i in range(3):
        for j in range(4):
            assert got[i, j] == pytest.approx(1 - distance.cosine(a[i, j], b[j]), abs=1e-12)


def test_cosine_undefined_for_zero_vector():
    got = metrics.cosine_similarity(np.zeros((2, 5)), np.ones((2, 5)))
    assert np.isnan(got).all()


def test_spearman_matches_scipy_including_ties():
    rng = _rng(1)
    a = rng.integers(0, 4, size=(5, 9)).astype(float)  # many ties
    b = rng.normal(size=(5, 9))
    got = metrics.spearman(a, b)
    for k in range(5):
        assert got[k] == pytest.approx(stats.spearmanr(a[k], b[k]).statistic, abs=1e-12)
    assert np.isnan(metrics.spearman(np.ones(6), rng.normal(size=6)))


def test_mean_sem_matches_scipy_and_ignores_nan():
    rng = _rng(2)
    v = rng.normal(size=(4, 11))
    v[1, 3] = v[2, 0] = v[2, 5] = np.nan
    mean, sem, n = metrics.mean_sem(v, axis=1)
    np.testing.assert_allclose(mean, np.nanmean(v, axis=1), rtol=1e-12)
    np.testing.assert_allclose(sem, stats.sem(v, axis=1, nan_policy="omit"), rtol=1e-12)
    np.testing.assert_array_equal(n, [11, 10, 9, 11])
    one = np.array([[0.3, np.nan]])
    m1, s1, n1 = metrics.mean_sem(one, axis=1)
    assert m1[0] == 0.3 and np.isnan(s1[0]) and n1[0] == 1


def test_similarity_curves_drop_t0_and_match_scipy():
    rng = _rng(3)
    E, Z, S = 4, 6, 8
    gold = rng.normal(size=(E, Z, S))
    gold[0] = 0.0  # t = 0 under the mean adjustment
    scores = rng.normal(size=(S, Z)) + 0.5 * gold[2].T
    c = metrics.similarity_curves(gold, scores, [0, 1, 2, 3])
    np.testing.assert_array_equal(c["eval_points"], [1, 2, 3])
    assert c["cosine"].shape == c["spearman"].shape == (3, Z)
    for e in range(1, E):
        cos = [1 - distance.cosine(gold[e, z], scores[:, z]) for z in range(Z)]
        rho = [stats.spearmanr(gold[e, z], scores[:, z]).statistic for z in range(Z)]
        np.testing.assert_allclose(c["cosine"][e - 1], cos, atol=1e-12)
        np.testing.assert_allclose(c["spearman"][e - 1], rho, atol=1e-12)
        assert c["cosine_mean"][e - 1] == pytest.approx(np.mean(cos), abs=1e-12)
        assert c["cosine_sem"][e - 1] == pytest.approx(stats.sem(cos), abs=1e-12)
        assert c["spearman_sem"][e - 1] == pytest.approx(stats.sem(rho), abs=1e-12)
    # scores built from gold[2] peak there
    pk = metrics.peak(c["cosine_mean"], c["cosine_sem"], c["eval_points"])
    assert pk["at"] == 2 and pk["value"] == pytest.approx(c["cosine_mean"][1])
    with pytest.raises(ValueError, match="do not match"):
        metrics.similarity_curves(gold, scores.T[:, :5], [0, 1, 2, 3])


def _gold_eq13(losses, seeds):
    """eq. 13 by hand: losses [E, Z, 1 + S, R] → [E, Z, S]."""
    L = losses[..., list(seeds)]
    loo = L[:, :, 1:, :]
    return (loo - loo.mean(axis=2, keepdims=True)).mean(axis=3)


def test_seed_count_study_on_hand_tensor():
    rng = _rng(4)
    E, Z, S, R = 3, 5, 6, 4
    losses = rng.normal(size=(E, Z, S + 1, R))
    losses[0] = losses[0, :, :1, :]  # t = 0: every model still θ*, all losses equal per test point
    eval_points = [0, 1, 2]
    scores = rng.normal(size=(S, Z))
    rows = metrics.seed_count_study(lambda g: _gold_eq13(losses, g), R, scores, eval_points)
    assert [r["n_seeds"] for r in rows] == [1, 2, 4]
    assert [r["n_groups"] for r in rows] == [4, 2, 1]
    for row in rows:
        r = row["n_seeds"]
        # explicit loops: cosine per group and test point, mean over both, max over t ≥ 1
        per_t = []
        for e in (1, 2):
            vals = []
            for start in range(0, R, r):
                g = _gold_eq13(losses, range(start, start + r))
                vals += [1 - distance.cosine(g[e, z], scores[:, z]) for z in range(Z)]
            per_t.append((np.mean(vals), stats.sem(vals)))
        best = int(np.argmax([m for m, _ in per_t]))
        assert row["peak"] == pytest.approx(per_t[best][0], abs=1e-12)
        assert row["sem"] == pytest.approx(per_t[best][1], abs=1e-12)
        assert row["at"] == best + 1
    # with all seeds in one group it is the plain peak of the full-gold curve
    c = metrics.similarity_curves(_gold_eq13(losses, range(R)), scores, eval_points)
    assert rows[-1]["peak"] == pytest.approx(np.max(c["cosine_mean"]), abs=1e-12)
    with pytest.raises(ValueError, match="does not divide"):
        metrics.seed_count_study(lambda g: _gold_eq13(losses, g), R, scores, eval_points, group_sizes=[3])


def test_mislabel_auc_matches_sklearn_and_pair_count():
    rng = _rng(5)
    flipped = np.zeros(30, bool)
    flipped[rng.choice(30, 6, replace=False)] = True
    s = rng.normal(size=30) + 1.5 * flipped
    s[3] = s[4]  # a tie
    got = metrics.mislabel_auc(s, flipped)
    assert got == pytest.approx(roc_auc_score(flipped, s), abs=1e-12)
    pos, neg = s[flipped], s[~flipped]
    pairs = ((pos[:, None] > neg[None]).sum() + 0.5 * (pos[:, None] == neg[None]).sum()) / (len(pos) * len(neg))
    assert got == pytest.approx(pairs, abs=1e-12)
    assert metrics.mislabel_auc(flipped.astype(float), flipped) == 1.0
    with pytest.raises(ValueError, match="flipped"):
        metrics.mislabel_auc(s, np.zeros(30, bool))


def test_bad_inputs_are_rejected_not_counted_as_undefined():
    rng = _rng(7)
    gold, scores = rng.normal(size=(4, 3, 6)), rng.normal(size=(6, 3))
    with pytest.raises(ValueError, match=r"eval_points: expected 4 values .* got shape \(3,\)"):
        metrics.similarity_curves(gold, scores, [1, 2, 3])
    # NaN means "undefined" (a zero / constant vector) only: a NaN input would silently drop a test point
    for name, a in (("scores", scores), ("gold", gold)):
        bad = a.copy()
        bad.flat[5] = np.nan
        args = {"gold": gold, "scores": scores, name: bad}
        with pytest.raises(ValueError, match=f"{name}: expected finite values"):
            metrics.similarity_curves(args["gold"], args["scores"], [0, 1, 2, 3])
    gold[2, 1] = 0.0  # a zero gold vector stays the documented undefined case
    out = metrics.similarity_curves(gold, scores, [0, 1, 2, 3])
    assert np.isnan(out["cosine"][1, 1]) and list(out["cosine_n"]) == [3, 2, 3]

    flipped = np.zeros(10, bool)
    flipped[:3] = True
    s = rng.normal(size=10)
    with pytest.raises(ValueError, match="self_scores and flipped"):
        metrics.mislabel_auc(s[:9], flipped)
    s[5] = np.inf
    with pytest.raises(ValueError, match="self_scores: expected finite values"):
        metrics.mislabel_auc(s, flipped)
