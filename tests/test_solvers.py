"""LiSSA and CG vs exact dense solves in float64 on tiny models (MATH.md §5)."""
import copy

import pytest
import torch
from curvature_helpers import data, dense_gn, dense_hessian, mlp, rel
from torch import nn

import fimoda_kernels as fk

N = 37


@pytest.fixture(scope="module")
def problem():
    """A ReLU MLP whose GN operator has λ_max ≈ 44 (inputs scaled by 8), its G and H."""
    model = mlp((5, 7, 6, 1), act=nn.ReLU)
    x, y = data(N, 5, scale=8.0)
    G, H = dense_gn(model, "mse", x, y), dense_hessian(model, "mse", x, y)
    V = torch.randn(4, G.shape[0], generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    return model, x, y, G, H, V


def _solve(M, lam, V):
    return torch.linalg.solve(M + lam * torch.eye(M.shape[0], dtype=M.dtype), V.T).T


# ----------------------------------------------------------------------------- CG

def test_cg_matches_dense_solve(problem):
    model, x, y, G, _, V = problem
    V = V.clone()
    V[2] = 0  # a zero right-hand side: x = 0, converged at once
    x_cg, info = fk.cg(fk.gn_hvp(model, "mse", x, y), V, 0.05, tol=1e-11)
    assert rel(x_cg, _solve(G, 0.05, V)) < 1e-8
    assert x_cg.dtype == torch.float64 and torch.all(x_cg[2] == 0)
    assert info["converged"].all() and info["iterations"][2] == 0 and (info["iterations"][[0, 1, 3]] > 5).all()
    assert info["residuals"].shape == (int(info["iterations"].max()) + 1, 4)
    assert (info["final_residual"] < 1e-9).all()
    assert (info["residuals"][-1] <= 1e-11).all() and (info["residuals"][0, [0, 1, 3]] == 1).all()


def test_cg_true_hessian_and_gn_differ(problem):
    model, x, y, G, H, V = problem
    lam = 1.0 - float(torch.linalg.eigvalsh(H).min())  # H + λI positive definite
    x_h, info = fk.cg(fk.hessian_hvp(model, "mse", x, y), V, lam, tol=1e-11)
    assert info["converged"].all() and rel(x_h, _solve(H, lam, V)) < 1e-8
    x_g, _ = fk.cg(fk.gn_hvp(model, "mse", x, y), V, lam, tol=1e-11)
    assert rel(x_g, _solve(G, lam, V)) < 1e-8 and rel(x_g, x_h) > 1e-3


def test_cg_rows_are_independent(problem):
    model, x, y, _, _, V = problem
    op = fk.gn_hvp(model, "mse", x, y)
    batched, _ = fk.cg(op, V, 0.1, tol=1e-10)
    for i in range(V.shape[0]):
        single, info = fk.cg(op, V[i], 0.1, tol=1e-10)
        assert single.shape == V[i].shape and rel(single, batched[i]) < 1e-9


def test_cg_not_converged_warns(problem):
    model, x, y, _, _, V = problem
    with pytest.warns(fk.CGNotConvergedWarning, match="did not reach tol"):
        x_cg, info = fk.cg(fk.gn_hvp(model, "mse", x, y), V, 1e-3, tol=1e-12, max_iter=2)
    assert not info["converged"].any() and (info["iterations"] == 2).all() and torch.isfinite(x_cg).all()


def test_cg_breakdown_raises():
    class Negative:  # an operator with -I curvature: M + 0.5 I is negative definite
        num_params, num_samples = 6, 1

        def __call__(self, V, batch=None):
            return -V

    with pytest.raises(fk.CGBreakdownError, match="not positive definite"):
        fk.cg(Negative(), torch.ones(2, 6, dtype=torch.float64), 0.5)


def test_cg_float32(problem):
    model, x, y, G, _, V = problem
    x32, info = fk.cg(fk.gn_hvp(model, "mse", x, y), V.float(), 0.1, tol=1e-5)
    assert x32.dtype == torch.float32 and info["converged"].all() and rel(x32, _solve(G, 0.1, V)) < 1e-4


# ----------------------------------------------------------------------------- LiSSA

def test_lissa_reaches_fixed_point(problem):
    """Full-data steps (deterministic): h_D/s → (M + d·s·I)^{-1} v, contraction max|1 − d − μ/s| ≤ 0.95."""
    model, x, y, G, _, V = problem
    out = fk.lissa(fk.gn_hvp(model, "mse", x, y), V, depth=700, scale=50.0, damping=0.05, batch_size=None)
    assert out.shape == V.shape and out.dtype == torch.float64
    assert rel(out, _solve(G, 0.05 * 50.0, V)) < 1e-10


def test_lissa_true_hessian_fixed_point(problem):
    model, x, y, _, H, V = problem
    lam_min = float(torch.linalg.eigvalsh(H).min())
    d = (20.0 - lam_min) / 50.0  # d·s = 20 − λ_min: H + d·s·I positive definite, |1 − d − μ/s| ≤ 0.6
    out = fk.lissa(fk.hessian_hvp(model, "mse", x, y), V[:2], depth=80, scale=50.0, damping=d, batch_size=None)
    assert rel(out, _solve(H, d * 50.0, V[:2])) < 1e-8


def test_lissa_absolute_damping(problem):
    """absolute_damping=True: damping is λ (torch-influence's damp); the fixed point does not move with s."""
    model, x, y, G, _, V = problem
    op = fk.gn_hvp(model, "mse", x, y)
    want = _solve(G, 10.0, V)
    for s in (50.0, 100.0):  # d = 10/s: contraction 1 − d ≥ max|1 − d − μ/s|
        out = fk.lissa(op, V, depth=int(3.5 * s), scale=s, damping=10.0, batch_size=None, absolute_damping=True)
        assert rel(out, want) < 1e-8


def test_lissa_stochastic_minibatches(problem):
    """Minibatches of N/2 drawn with replacement: an unbiased-in-the-limit estimate, near the fixed point."""
    model, x, y, G, _, V = problem
    op = fk.gn_hvp(model, "mse", x, y)
    want = _solve(G, 0.05 * 100.0, V)
    out = fk.lissa(op, V, depth=400, scale=100.0, damping=0.05, batch_size=N // 2, repeat=4, seed=1)
    assert rel(out, want) < 0.1
    assert rel(out, fk.lissa(op, V, depth=400, scale=100.0, damping=0.05, batch_size=N // 2, repeat=4, seed=2)) > 1e-6


def test_lissa_batched_equals_one_at_a_time(problem):
    model, x, y, _, _, V = problem
    op = fk.gn_hvp(model, "mse", x, y)
    kw = dict(depth=120, scale=100.0, damping=0.01, batch_size=8, seed=4, repeat=2)
    batched = fk.lissa(op, V, **kw)
    for i in range(V.shape[0]):
        single = fk.lissa(op, V[i], **kw)
        assert single.shape == V[i].shape and rel(single, batched[i]) < 1e-12


def test_lissa_divergence_raises(problem):
    """The run-time κ check (the spectral check off, which would stop this run before it starts)."""
    model, x, y, _, _, V = problem
    with pytest.raises(fk.LiSSADivergedError, match="diverged at iteration") as err:
        fk.lissa(fk.gn_hvp(model, "mse", x, y), V, depth=2000, scale=10.0, damping=0.01, batch_size=None,
                 max_growth=None)
    e = err.value
    assert 1 < e.iteration < 2000 and e.scale == 10.0 and e.norms.shape == (4,) and len(e.rows) >= 1
    assert (e.norms[e.rows] > e.threshold[e.rows]).all() or not torch.isfinite(e.norms[e.rows]).all()


def test_lissa_auto_scale_picks_expected_rung(problem):
    """Full-data steps diverge iff s < λ_max/(2 − d): with λ_max ≈ 44 the rung is 50 (10 and 20 rejected)."""
    model, x, y, G, _, V = problem
    d = 0.01
    boundary = float(torch.linalg.eigvalsh(G).max()) / (2 - d)
    ladder = fk.lissa_scale_ladder()
    assert ladder[:9] == [10, 20, 50, 100, 200, 500, 1000, 2000, 5000] and ladder[-1] == 1e7
    expected = min(s for s in ladder if s > boundary)
    assert expected == 50 and 20 < 0.95 * boundary  # not a marginal case
    out, info = fk.lissa(fk.gn_hvp(model, "mse", x, y), V, depth=300, scale="auto", damping=d,
                         batch_size=None, return_info=True)
    assert info["scale"] == expected and [t[0] for t in info["tried"]] == [10, 20]
    assert info["effective_damping"] == pytest.approx(d * expected)
    assert rel(out, fk.lissa(fk.gn_hvp(model, "mse", x, y), V, depth=300, scale=50.0, damping=d,
                             batch_size=None)) == 0


def test_extreme_eigenvalues_match_dense(problem):
    model, x, y, G, H, _ = problem
    for op, M in ((fk.gn_hvp(model, "mse", x, y), G), (fk.hessian_hvp(model, "mse", x, y), H)):
        ev = torch.linalg.eigvalsh(M)
        lo, hi = fk.extreme_eigenvalues(op)
        assert abs(hi - float(ev[-1])) < 1e-8 * float(ev[-1]) and abs(lo - float(ev[0])) < 1e-8 * float(ev[-1])
        assert lo >= float(ev[0]) - 1e-10 and hi <= float(ev[-1]) + 1e-10  # Rayleigh quotients: inside
    with pytest.raises(ValueError, match="steps: expected an integer >= 1"):
        fk.extreme_eigenvalues(op, steps=0)
    with pytest.raises(TypeError, match="seed: expected an integer"):
        fk.extreme_eigenvalues(op, seed=1.5)
    with pytest.raises(TypeError, match="hvp: expected an operator"):
        fk.extreme_eigenvalues(lambda V: V)


def test_lissa_slow_divergence_is_caught(problem):
    """A scale just under (λ_max + λ)/2 (GN): the top direction's factor is −1.005, its growth over the
    run (2e4) stays below the κ bound, yet the result is wrong many times over; the spectral check
    refuses to run it."""
    model, x, y, G, _, V = problem
    op, lam, depth = fk.gn_hvp(model, "mse", x, y), 1.0, 2000
    s = (float(torch.linalg.eigvalsh(G).max()) + lam) / 2.005
    unchecked = fk.lissa(op, V, depth, s, lam, batch_size=None, absolute_damping=True, max_growth=None)
    assert rel(unchecked, _solve(G, lam, V)) > 10  # silently wrong without the check
    with pytest.raises(fk.LiSSADivergedError, match="spectral check.*below .θ_max . λ./2") as err:
        fk.lissa(op, V, depth, s, lam, batch_size=None, absolute_damping=True)
    assert err.value.iteration == 0 and err.value.scale == s


def test_lissa_alternating_top_direction_must_converge(problem):
    """A scale just above the divergence edge: the top factor is −1.0003, so the top direction neither
    blows up (its growth over 300 steps, 1.09, is far under max_growth) nor converges, and the result is
    wrong by ~100%; an alternating factor must decay, so the check refuses it and 'auto' moves on."""
    model, x, y, G, _, _ = problem
    op, depth = fk.gn_hvp(model, "mse", x, y), 300
    ev, vecs = torch.linalg.eigh(G)
    s = float(ev[-1])
    lam = 1.0003 * s  # d = 1.0003: the top factor 1 − d − θ_max/s = −1.0003
    V = (vecs[:, -1] + 0.1 * vecs[:, 0])[None]  # mostly the top eigendirection
    unchecked = fk.lissa(op, V, depth, s, lam, batch_size=None, absolute_damping=True, max_growth=None)
    assert rel(unchecked, _solve(G, lam, V)) > 0.5  # silently wrong without the check
    with pytest.raises(fk.LiSSADivergedError, match="alternates in sign and does not decay"):
        fk.lissa(op, V, depth, s, lam, batch_size=None, absolute_damping=True)
    out, info = fk.lissa(op, V, depth, "auto", lam, batch_size=None, absolute_damping=True, return_info=True)
    assert rel(out, _solve(G, lam, V)) < 1e-6 and info["scale"] > s


def test_lissa_negative_curvature_picks_a_bounded_scale(problem):
    """True Hessian with λ_min(H) + λ < 0: every step grows the negative direction by 1 + |μ|/s, so
    'auto' rejects the rungs where that compounds past max_growth over the depth and names the cause."""
    model, x, y, _, H, V = problem
    ev = torch.linalg.eigvalsh(H)
    lam, depth = 0.01, 300
    mu = float(ev[0]) + lam
    assert mu < -0.05  # indefinite after damping
    op = fk.hessian_hvp(model, "mse", x, y)
    _, info = fk.lissa(op, V, depth, "auto", lam, batch_size=None, absolute_damping=True, return_info=True)
    s = info["scale"]

    def dense_growth(scale):
        return max(abs(1 - (float(e) + lam) / scale) for e in (ev[0], ev[-1])) ** depth

    assert dense_growth(s) <= 10 * (1 + 1e-6) and info["growth"] == pytest.approx(dense_growth(s), rel=1e-6)
    assert all(t[1] == 0 and dense_growth(t[0]) > 10 for t in info["tried"]) and len(info["tried"]) >= 2
    with pytest.raises(fk.LiSSADivergedError, match="negative curvature.*needs s ≥"):
        fk.lissa(op, V, depth, info["tried"][-1][0], lam, batch_size=None, absolute_damping=True)
    # at a small scale the top of the spectrum grows faster: the message names the scale, not the curvature
    with pytest.raises(fk.LiSSADivergedError, match=r"below \(θ_max \+ λ\)/2"):
        fk.lissa(op, V, depth, 10.0, lam, batch_size=None, absolute_damping=True)


def test_lissa_auto_skips_scales_below_half_the_damping(problem):
    """With absolute damping λ, a rung s ≤ λ/2 (d = λ/s ≥ 2) is skipped, not an error."""
    model, x, y, G, _, V = problem
    op = fk.gn_hvp(model, "mse", x, y)
    out, info = fk.lissa(op, V, 300, "auto", 25.0, batch_size=None, absolute_damping=True, return_info=True)
    assert info["scale"] == 50 and [t[0] for t in info["tried"]] == [20]  # 10 skipped (d = 2.5)
    assert rel(out, _solve(G, 25.0, V)) < 1e-6
    with pytest.raises(ValueError, match="damping: λ = 50.0 needs a scale > λ/2 = 25"):
        fk.lissa(op, V, 300, "auto", 50.0, absolute_damping=True, max_scale=20)


def test_lissa_auto_scale_gives_up_at_the_maximum(problem):
    model, x, y, _, _, V = problem
    with pytest.raises(fk.LiSSADivergedError, match="every scale of the ladder up to max_scale=20") as err:
        fk.lissa(fk.gn_hvp(model, "mse", x, y), V, depth=300, scale="auto", damping=0.01, batch_size=None,
                 max_scale=20)
    assert [t[0] for t in err.value.tried] == [10, 20]


def test_lissa_dtypes(problem):
    model, x, y, G, _, V = problem
    out = fk.lissa(fk.gn_hvp(model, "mse", x, y), V.float(), depth=700, scale=50.0, damping=0.05, batch_size=None)
    assert out.dtype == torch.float32 and rel(out, _solve(G, 2.5, V)) < 1e-5
    torch_backend = fk.lissa(fk.gn_hvp(model, "mse", x, y), V, depth=50, scale=50.0, damping=0.05, batch_size=5,
                             backend="torch")
    assert rel(torch_backend, fk.lissa(fk.gn_hvp(model, "mse", x, y), V, depth=50, scale=50.0, damping=0.05,
                                       batch_size=5)) < 1e-13


def test_validation(problem):
    model, x, y, _, _, V = problem
    op = fk.gn_hvp(model, "mse", x, y)
    p = op.num_params
    bad = [(dict(depth=0), ValueError, "depth"), (dict(damping=-1.0), ValueError, "damping"),
           (dict(damping=2.0), ValueError, "damping"), (dict(scale=0.0), ValueError, "scale"),
           (dict(scale="big"), ValueError, "scale"), (dict(batch_size=0), ValueError, "batch_size"),
           (dict(repeat=0), ValueError, "repeat"), (dict(depth=2.5), TypeError, "depth")]
    for kw, exc, name in bad:
        args = dict(depth=5, scale=50.0, damping=0.1) | kw
        with pytest.raises(exc, match=name):
            fk.lissa(op, V, **args)
    with pytest.raises(ValueError, match=rf"v: expected \[r, {p}\] or \[{p}\]"):
        fk.lissa(op, V[:, :-1], 5, 50.0, 0.1)
    with pytest.raises(ValueError, match="v: expected finite"):
        fk.cg(op, torch.full((1, p), float("nan"), dtype=torch.float64), 0.1)
    with pytest.raises(TypeError, match="v: expected dtype"):
        fk.cg(op, V.half(), 0.1)
    with pytest.raises(TypeError, match="hvp: expected an operator"):
        fk.cg(lambda V: V, V, 0.1)
    with pytest.raises(ValueError, match="tol"):
        fk.cg(op, V, 0.1, tol=0.0)
    with pytest.raises(ValueError, match="max_iter"):
        fk.cg(op, V, 0.1, max_iter=0)


@pytest.mark.triton
def test_lissa_with_the_triton_update(problem):
    """The solver on the Triton fused update (GPU, or the interpreter here) equals the cpu/torch path."""
    from helpers import TRITON_DEVICE, triton_module

    triton_module("lissa_update")
    model, x, y, _, _, V = problem
    if TRITON_DEVICE == "cuda":
        model, x, y, V = copy.deepcopy(model).cuda(), x.cuda(), y.cuda(), V.cuda()
    op = fk.gn_hvp(model, "mse", x, y)
    kw = dict(depth=30, scale=50.0, damping=0.05, batch_size=9, seed=3)
    got = fk.lissa(op, V, backend="triton", **kw)
    assert rel(got.cpu(), fk.lissa(op, V, backend="torch", **kw).cpu()) < 1e-12


class _Diagonal:
    """M = diag(ev) as an HVP operator (one sample, full batch)."""

    def __init__(self, ev):
        self.M = torch.diag(torch.tensor(ev, dtype=torch.float64))
        self.num_params, self.num_samples = len(ev), 1

    def __call__(self, h, batch=None, out=None):
        return h @ self.M


@pytest.mark.parametrize("ev, s, accepted", [
    ([2.0, 1.0, 0.01], 1.02, True),    # top factor −0.96 keeps 2% after 100 steps, as the 0.99 direction keeps 37%
    ([2.0, 1.0, 0.0], 0.995, False),   # top factor −1.01: neither grows much nor converges
    ([2.0, 1.0, -0.02], 0.995, False),  # the same beside negative curvature (growth 1.02^100, allowed)
])
def test_lissa_alternating_rule_relative_to_the_slowest_direction(ev, s, accepted):
    """An alternating direction must converge as far as the slowest converging monotone one (LiSSA's
    usual truncation) or to 1/max_growth; a growing negative-curvature direction is no excuse (with it
    the top direction's result came out 275% off)."""
    v = torch.ones(len(ev), dtype=torch.float64)
    if accepted:
        x = fk.lissa(_Diagonal(ev), v, 100, s, 0.0, batch_size=None)
        assert abs(float(x[0]) - 1 / ev[0]) < 0.05 / ev[0]
    else:
        with pytest.raises(fk.LiSSADivergedError, match="alternates in sign and does not decay"):
            fk.lissa(_Diagonal(ev), v, 100, s, 0.0, batch_size=None)


def test_lissa_names_an_operator_whose_products_require_grad():
    """A user operator built on tensors that require grad: LiSSA (native updates) is not differentiable
    and says so about the operator, not about an internal argument of its update."""
    op = _Diagonal([2.0, 1.0])
    op.M.requires_grad_()
    with pytest.raises(ValueError, match="hvp: expected products that do not require grad"):
        fk.lissa(op, torch.ones(2, dtype=torch.float64), 10, 10.0, 0.0, batch_size=None, max_growth=None)
    with torch.no_grad():
        fk.lissa(op, torch.ones(2, dtype=torch.float64), 10, 10.0, 0.0, batch_size=None, max_growth=None)


def test_cg_solves_rows_of_any_scale():
    """CG runs every row at unit norm: a float32 right-hand side of norm ~1e-22 (the loss gradient of
    a confidently classified point) squared to 0 and broke the recursion (pᵀAp = 0 / a NaN residual);
    now it converges like its rescaled copy, and a huge row does not overflow."""
    op = _Diagonal([3.0, 1.0, 0.5, 0.2])
    op.M = op.M.float()
    v = torch.tensor([[1.0, -2.0, 0.5, 1.0]])
    scales = torch.tensor([[1.0], [1e-22], [1e30]])
    x, info = fk.cg(op, v * scales, 0.1, tol=1e-5, max_iter=20)
    assert bool(info["converged"].all())
    exact = (v / (torch.tensor([3.0, 1.0, 0.5, 0.2]) + 0.1)) * scales
    assert float(((x - exact).abs() / exact.abs()).max()) < 1e-5


def test_lissa_solves_rows_of_any_scale():
    """LiSSA runs every row at unit norm too: a float32 row of norm ~1e-23 had ‖v‖ underflow to 0, so
    its divergence threshold κ·‖v‖·s was 0 and every scale was refused."""
    op = _Diagonal([3.0, 1.0, 0.5, 0.2])
    op.M = op.M.float()
    v = torch.tensor([[1.0, -2.0, 0.5, 1.0]])
    scales = torch.tensor([[1.0], [1e-23], [1e30]])
    x, info = fk.lissa(op, v * scales, 1000, 10.0, 0.0, batch_size=None, max_growth=None, return_info=True)
    exact = (v / torch.tensor([3.0, 1.0, 0.5, 0.2])) * scales
    assert float(((x - exact).abs() / exact.abs()).max()) < 1e-4
    assert torch.allclose(info["final_norms"], (x.double() * 10.0).norm(dim=1), rtol=1e-5)


def test_solvers_at_float64_extremes_and_overflow():
    """Rows are scaled by their largest entry (exact): float64 rows of norm 1e-300 / 1e200 are solved,
    not taken for zero rows or flattened by a clamped norm; a solution past the dtype's range is an
    error, not Inf; LiSSA's divergence error speaks in the caller's units."""
    ev = [3.0, 1.0, 0.5, 0.2]
    op = _Diagonal(ev)
    v = torch.tensor([[1.0, -2.0, 0.5, 1.0]], dtype=torch.float64)
    for scale in (1e-300, 1e200):
        x, info = fk.cg(op, v * scale, 0.1, tol=1e-10, max_iter=20)
        assert float(((x / (v * scale / (torch.tensor(ev, dtype=torch.float64) + 0.1)) - 1).abs().max())) < 1e-8
    f32 = _Diagonal(ev)
    f32.M = f32.M.float() * 1e-30
    with pytest.raises(ValueError, match="v: CG's solution overflows torch.float32"):
        fk.cg(f32, torch.full((1, 4), 1e10), 1e-30, max_iter=20)
    with pytest.raises(fk.LiSSADivergedError) as err:  # scale 1 < λ_max / 2: it diverges
        fk.lissa(op, v * 1e5, 50, 1.0, 0.0, batch_size=None, max_growth=None)
    assert abs(float(err.value.threshold[0]) / (1e3 * float((v * 1e5).norm()) * 1.0) - 1) < 1e-12


def test_solvers_take_no_right_hand_sides(problem):
    """v of shape [0, p]: an empty result (LiSSA's operator call with out= took the two empty tensors'
    shared null pointer for overlapping memory)."""
    model, x, y, G, _, V = problem
    op = fk.gn_hvp(model, "mse", x, y)
    for out in (fk.lissa(op, V[:0], depth=5, scale=50.0, damping=0.05), fk.cg(op, V[:0], damping=0.05)[0]):
        assert out.shape == (0, G.shape[0])
