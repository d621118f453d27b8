"""Every attribution method vs a float64 dense reference on a tiny model (explicit per-sample
gradients, G and H), plus the sign convention against exact leave-one-out refits."""
import pytest
import torch
from torch import nn

import fimoda_kernels as fk
from fimoda_kernels._dispatch import backend_unavailable_reasons
from fimoda_kernels.grads import per_sample_grads
from fimoda_kernels.projection import project_model

from helpers import Reordering, randn, rel

N, M = 40, 7


def _mlp(seed=0, d=3, classes=1):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d, 5), nn.Tanh(), nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, classes)).double()


def _data(n, d=3, seed=1, classes=None):
    x = randn(n, d, dtype=torch.float64, seed=seed)
    if classes is None:
        y = randn(n, dtype=torch.float64, seed=seed + 100)
    else:
        y = torch.randint(0, classes, (n,), generator=torch.Generator().manual_seed(seed + 100))
    return x, y


@pytest.fixture(params=["mse", "cross_entropy"])
def problem(request):
    if request.param == "mse":
        model, train, test = _mlp(), _data(N), _data(M, seed=2)
    else:
        model, train, test = _mlp(classes=3), _data(N, classes=3), _data(M, seed=2, classes=3)
    return model.eval(), request.param, train, test


class Dense:
    """Explicit float64 quantities of a (tiny) model on a data set."""

    def __init__(self, model, task, train, test):
        self.task = fk.get_task(task)
        self.model, self.train, self.test = model, train, test
        self.g_tr = per_sample_grads(model, task, *train)
        self.g_te = per_sample_grads(model, task, *test)
        self.J = per_sample_grads(model, task, *train, wrt="output")
        self.J_te = per_sample_grads(model, task, *test, wrt="output")
        with torch.no_grad():
            f = self.task.output(model(train[0]), train[1])
        self.d1, self.d2 = self.task.dloss(f, train[1]), self.task.d2loss(f, train[1])
        self.G = self.J.T @ (self.d2[:, None] * self.J) / N
        self.p = self.G.shape[0]
        self.lam0 = float((self.g_tr ** 2).sum() / (N * self.p))

    def inv_score(self, Mat, lam, g_tr=None):
        A = Mat + lam * torch.eye(self.p, dtype=torch.float64)
        g_tr = self.g_tr if g_tr is None else g_tr
        return g_tr @ torch.linalg.solve(A, self.g_te.T)

    def hessian(self):
        params = dict(self.model.named_parameters())
        names = list(params)

        def risk(*flat):
            out = torch.func.functional_call(self.model, dict(zip(names, flat)), (self.train[0],))
            return self.task.loss(out, self.train[1]).mean()

        blocks = torch.autograd.functional.hessian(risk, tuple(params.values()))
        return torch.cat([torch.cat([blocks[i][j].reshape(params[names[i]].numel(), -1)
                                     for j in range(len(names))], 1) for i in range(len(names))], 0)


def test_grad_dot_and_cos(problem):
    model, task, train, test = problem
    D = Dense(model, task, train, test)
    assert rel(fk.attribute("grad_dot", model, task, train, test), D.g_tr @ D.g_te.T) < 1e-12
    cos = (D.g_tr / D.g_tr.norm(dim=1, keepdim=True)) @ (D.g_te / D.g_te.norm(dim=1, keepdim=True)).T
    assert rel(fk.attribute("grad_cos", model, task, train, test), cos) < 1e-12


def test_cg_matches_dense_solve(problem):
    model, task, train, test = problem
    D = Dense(model, task, train, test)
    out = fk.attribute("cg", model, task, train, test, tol=1e-12, max_iter=500)
    assert rel(out, D.inv_score(D.G, 100 * D.lam0)) < 1e-8  # default damping = 100·λ₀
    out = fk.attribute("cg", model, task, train, test, damping=0.05, tol=1e-12, max_iter=500)
    assert rel(out, D.inv_score(D.G, 0.05)) < 1e-8


def test_cg_that_cannot_converge_is_an_error():
    """λ = 0 with a singular G (rank ≤ 40 points < p = 59, one margin output each): CG runs off to ~1e18;
    that is refused with the cause, not returned with a warning."""
    model, train, test = _mlp(classes=3), _data(N, classes=3), _data(M, seed=2, classes=3)
    with pytest.warns(fk.CGNotConvergedWarning), \
            pytest.raises(ValueError, match=r"damping: CG left a relative residual of .* raise the damping"):
        fk.attribute("cg", model, "cross_entropy", train, test, damping=0.0, max_iter=300)


@pytest.mark.parametrize("method", ["lissa", "lissa_h"])
def test_lissa_reaches_its_fixed_point(problem, method):
    model, task, train, test = problem
    D = Dense(model, task, train, test)
    Mat = D.G if method == "lissa" else D.hessian()
    eig = torch.linalg.eigvalsh(Mat)
    lam = max(0.0, -float(eig.min())) + 0.5  # M + λI positive definite
    scale = float(eig.max()) + lam  # contraction 1 − (λ_min + λ)/s per step: depth 400 reaches 1e-10
    out = fk.attribute(method, model, task, train, test, damping=lam, scale=scale, depth=400, batch_size=N)
    assert rel(out, D.inv_score(Mat, lam)) < 1e-6


def test_lissa_and_lissa_h_differ_off_stationarity():
    model, train, test = _mlp(seed=3), _data(N), _data(M, seed=2)
    D = Dense(model.eval(), "mse", train, test)
    H = D.hessian()
    assert rel(H, D.G) > 1e-2  # not a least-squares optimum: the residual term matters
    eig = torch.linalg.eigvalsh(H)
    lam = max(0.0, -float(eig.min())) + 0.5  # H + λI ≻ 0
    kw = dict(damping=lam, scale=max(float(eig.max()), float(torch.linalg.eigvalsh(D.G).max())) + lam, depth=400,
              batch_size=N)
    a = fk.attribute("lissa", model, "mse", train, test, **kw)
    b = fk.attribute("lissa_h", model, "mse", train, test, **kw)
    assert rel(a, D.inv_score(D.G, lam)) < 1e-6 and rel(b, D.inv_score(H, lam)) < 1e-6
    assert rel(a, b) > 1e-3


@pytest.mark.parametrize("k_over_p", [1, 3])
def test_trak_equals_gn_inverse_formula(k_over_p):
    # λ = 0 and k ≥ p: φ_zᵀ(ΦᵀΦ)^{-1}φ_i (−φ'_i) = ∇f_zᵀ (JᵀJ)^{-1} ∇f_i (−φ'_i)
    model, train, test = _mlp(), _data(200), _data(M, seed=2)
    D = Dense(model.eval(), "mse", train, test)
    ref = (D.J @ torch.linalg.solve(D.J.T @ D.J, D.J_te.T)) * (-D.d1)[:, None]
    sc = fk.attribute_scores("trak", model, "mse", train, test, proj_dim=k_over_p * D.p, seed=5)
    assert rel(sc.scores, ref) < 1e-5  # JᵀJ is ill-conditioned
    assert sc.info["dropped"] == (k_over_p - 1) * D.p  # rank(Φ) = p


@pytest.mark.parametrize("n, k, dup", [(20, 10, False), (20, 20, False), (20, 35, False), (20, 2048, False),
                                        (20, 35, True), (60, 100, False)])
def test_trak_is_the_pseudo_inverse_formula(n, k, dup):
    # φ_zᵀ (ΦᵀΦ)⁺ φ_i (−φ'_i) = [(Φ⁺)ᵀ Φ_teᵀ]_iz (−φ'_i), also where ΦᵀΦ is singular (k > n): Φ of full
    # row rank, a duplicated training point, or rank(Φ) ≤ p = 49 < n = 60
    model, train, test = _mlp().eval(), _data(n), _data(M, seed=2)
    if dup:
        train = tuple(torch.cat([t, t[3:4]]) for t in train)
    D = Dense(model, "mse", train, test)
    Phi, Phi_te = (project_model(model, "mse", *pair, k=k, seed=3, wrt="output") for pair in (train, test))
    ref = (torch.linalg.pinv(Phi).T @ Phi_te.T) * (-D.d1)[:, None]
    sc = fk.attribute_scores("trak", model, "mse", train, test, proj_dim=k, seed=3)
    # k ≤ n solves the Gram matrix ΦᵀΦ (error ∝ cond(Φ)² ≈ 4e8 here), k > n works on Φ itself
    assert rel(sc.scores, ref) < (1e-7 if k <= n else 1e-10)
    assert sc.info["dropped"] == min(n + dup, k) - min(n, D.p, k)  # rows (or k) beyond rank(Φ)


@pytest.mark.parametrize("k", [20, 26, 40, 60])
def test_trak_float32_where_k_exceeds_the_parameters(k):
    """p = 25 < k ≤ n = 60: ΦᵀΦ is singular, but float32 rounding makes it numerically full rank, and
    an inverse (Cholesky, with or without jitter) amplified that rounding: float32 scores were 34%
    off the float64 ones at k = 26. At Φ's numerical rank both match the GN-inverse formula."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Tanh(), torch.nn.Linear(5, 1))  # p = 26
    model[0].bias.requires_grad_(False)  # p = 21 trainable
    train, test = _data(60, d=3), _data(4, d=3, seed=2)
    out = {dt: fk.attribute_scores("trak", model.to(dt), "mse", tuple(t.to(dt) for t in train),
                                   tuple(t.to(dt) for t in test), proj_dim=k, seed=1) for dt in (torch.float32,
                                                                                             torch.float64)}
    D = Dense(model.double().eval(), "mse", train, test)
    ref = (D.J @ torch.linalg.solve(D.J.T @ D.J, D.J_te.T)) * (-D.d1)[:, None]
    if k >= D.p:  # the projection then loses nothing
        assert rel(out[torch.float64].scores, ref) < 1e-8
    assert rel(out[torch.float32].scores.double(), out[torch.float64].scores) < 1e-4
    assert out[torch.float32].info["dropped"] == out[torch.float64].info["dropped"] == max(0, k - D.p)


def test_trak_refuses_non_finite_projections(monkeypatch):
    """A non-finite Φ (here injected) is an error on both solve paths, not zeros from the SVD of k > n."""
    import fimoda_kernels.methods.trak as trak_mod

    real = trak_mod.project_model

    def poisoned(*args, **kw):
        phi = real(*args, **kw)
        phi[1, 3] = float("inf")
        return phi

    monkeypatch.setattr(trak_mod, "project_model", poisoned)
    model, train, test = _mlp(), _data(N), _data(M, seed=2)
    for k in (16, 64):  # k ≤ n and k > n
        with pytest.raises(ValueError, match="trak: non-finite projected training gradients"):
            fk.attribute("trak", model, "mse", train, test, proj_dim=k)


@pytest.mark.parametrize("blocks", ["layer", "parameter"])
def test_datainf_matches_its_formula(problem, blocks):
    model, task, train, test = problem
    D = Dense(model, task, train, test)
    sc = fk.attribute_scores("datainf", model, task, train, test, blocks=blocks)
    # "layer": the three Linear modules, each weight + bias (named_parameters order: w0 b0 w1 b1 w2 b2);
    # "parameter": each of the six tensors
    ref, col = 0, 0
    for name, mod in model.named_children():
        if not isinstance(mod, nn.Linear):
            continue
        parts = ([(name, mod.weight.numel() + mod.bias.numel())] if blocks == "layer" else
                 [(f"{name}.weight", mod.weight.numel()), (f"{name}.bias", mod.bias.numel())])
        for key, numel in parts:
            gl, gz = D.g_tr[:, col:col + numel], D.g_te[:, col:col + numel]
            col += numel
            sq = (gl ** 2).sum(1)
            lam = float((gl ** 2).mean(1).mean()) / 10
            assert sc.info["lambdas"][key] == pytest.approx(lam, rel=1e-10)
            K = gl @ gz.T
            ref = ref + (K - (gl @ gl.T) @ (K / (lam + sq)[:, None]) / N) / lam
    assert rel(sc.scores, ref) < 1e-10
    if blocks == "parameter":
        self_inf = fk.self_influence("datainf", model, task, train, blocks=blocks, max_memory=4096)
        want = fk.attribute_scores("datainf", model, task, train, train, blocks=blocks).scores.diagonal()
        assert rel(self_inf, want) < 1e-10
        return
    # a reference subsample uses only those rows in the inner sum
    sub = fk.attribute_scores("datainf", model, task, train, test, reference=15, seed=3, damping=0.01)
    assert sub.info["reference"] == 15 and rel(sub.scores, ref) > 1e-6


def _gif_dense(D, lam, form, model, task):
    gradR = D.g_tr.mean(0)
    delta = -torch.linalg.solve(D.G + lam * torch.eye(D.p, dtype=torch.float64), gradR)
    if form == "gn":
        g_tilde = (D.d1 + D.d2 * (D.J @ delta))[:, None] * D.J
    else:
        import copy
        shifted = copy.deepcopy(model)
        with torch.no_grad():
            torch.nn.utils.vector_to_parameters(torch.nn.utils.parameters_to_vector(shifted.parameters()) + delta,
                                                shifted.parameters())
        g_tilde = per_sample_grads(shifted, task, *D.train)
    return D.inv_score(D.G, lam, g_tilde)


@pytest.mark.parametrize("form", ["gn", "eq16"])
def test_generalized_if_matches_dense(problem, form):
    model, task, train, test = problem
    D = Dense(model, task, train, test)
    out = fk.attribute("generalized_if", model, task, train, test, form=form, damping=0.03, tol=1e-12, max_iter=500)
    assert rel(out, _gif_dense(D, 0.03, form, model, task)) < 1e-7
    assert rel(out, fk.attribute("cg", model, task, train, test, damping=0.03, tol=1e-12, max_iter=500)) > 1e-3


def test_generalized_if_equals_if_at_a_stationary_point():
    # a convex model at its exact optimum: ∇R_D = 0, so Δ_D = 0 and the generalized IF is the IF
    x, y = _data(N)
    model = nn.Linear(3, 1).double()
    X1 = torch.cat([x, torch.ones(N, 1, dtype=torch.float64)], 1)
    w = torch.linalg.lstsq(X1, y[:, None]).solution[:, 0]
    with torch.no_grad():
        model.weight.copy_(w[:3][None])
        model.bias.copy_(w[3:])
    test = _data(M, seed=2)
    kw = dict(damping=0.01, tol=1e-13, max_iter=500)
    for form in ("gn", "eq16"):
        sc = fk.attribute_scores("generalized_if", model, "mse", (x, y), test, form=form, **kw)
        assert sc.info["newton_step_norm"] < 1e-10
        assert rel(sc.scores, fk.attribute("cg", model, "mse", (x, y), test, **kw)) < 1e-8


def test_sign_matches_real_leave_one_out():
    # ridge regression refitted without each point: positive score ⇔ removing it raises the test loss
    n, d, lam = 400, 4, 0.1
    x, y = _data(n, d=d, seed=7)
    y = x @ randn(d, dtype=torch.float64, seed=8) + 0.3 * y
    test = _data(M, d=d, seed=9)
    test = (test[0], test[0] @ randn(d, dtype=torch.float64, seed=8))

    def fit(keep):  # minimizes (1/n) Σ_{j∈keep} (w·x_j − y_j)² + (λ/2)‖w‖²
        A = 2 * x[keep].T @ x[keep] / n + lam * torch.eye(d, dtype=torch.float64)
        return torch.linalg.solve(A, 2 * x[keep].T @ y[keep] / n)

    w = fit(torch.arange(n))
    model = nn.Linear(d, 1, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(w[None])
    loss = lambda w_: (test[0] @ w_ - test[1]) ** 2
    effect = torch.stack([loss(fit(torch.cat([torch.arange(i), torch.arange(i + 1, n)]))) - loss(w)
                          for i in range(n)])
    scores = fk.attribute("cg", model, "mse", (x, y), test, damping=lam, tol=1e-13) / n
    assert rel(scores, effect) < 0.05  # first-order in 1/n
    big = effect.abs() > 0.1 * effect.abs().max()
    assert bool((torch.sign(scores[big]) == torch.sign(effect[big])).all())


def test_self_influence_and_scores_helper(problem):
    model, task, train, test = problem
    D = Dense(model, task, train, test)
    assert rel(fk.self_influence("grad_dot", model, task, train), (D.g_tr ** 2).sum(1)) < 1e-12
    full = fk.attribute("cg", model, task, train, train, damping=0.05, tol=1e-12)
    sc = fk.attribute_scores("cg", model, task, train, test, self_influence=True, damping=0.05, tol=1e-12)
    assert rel(sc.self_influence, full.diagonal()) < 1e-10
    assert sc.scores.shape == (N, M) and sc.options.damping == 0.05 and sc.seconds > 0
    assert model.training is False


def test_dataloader_inputs_and_mode_restored():
    model, train, test = _mlp(), _data(N), _data(M, seed=2)
    model.train()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(*train), batch_size=7)
    a = fk.attribute("grad_dot", model, "mse", loader, test)
    assert model.training
    assert rel(a, fk.attribute("grad_dot", model, "mse", train, test)) < 1e-14


def test_training_mode_model_is_attributed_in_eval_mode():
    """A model with Dropout passed in training mode is attributed in eval mode (as documented), not
    refused, and left in training mode."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.2), nn.Tanh(), nn.Linear(4, 1)).double()
    train, test = _data(N), _data(M, seed=2)
    got = fk.attribute("cg", model, "mse", train, test, damping=0.1)
    assert model.training
    assert torch.equal(got, fk.attribute("cg", model.eval(), "mse", train, test, damping=0.1))


def test_bad_method_and_options():
    model, train, test = _mlp(), _data(N), _data(M, seed=2)
    with pytest.raises(ValueError, match="method: expected one of"):
        fk.attribute("influence", model, "mse", train, test)
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['depht'\]"):
        fk.attribute("lissa", model, "mse", train, test, depht=10)
    with pytest.raises(ValueError, match="damping"):
        fk.attribute("cg", model, "mse", train, test, damping=-1.0)
    with pytest.raises(ValueError, match="form"):
        fk.attribute("generalized_if", model, "mse", train, test, form="newton")
    with pytest.raises(TypeError, match="train"):
        fk.attribute("grad_dot", model, "mse", train[0], test)
    with pytest.raises(ValueError, match="test"):
        fk.attribute_scores("grad_dot", model, "mse", train, None, self_influence=False)
    bad = train[0].clone()
    bad[3, 1] = float("nan")
    with pytest.raises(ValueError, match="train: inputs contain NaN or Inf"):
        fk.attribute("cg", model, "mse", (bad, train[1]), test)
    assert set(fk.METHODS) == {"grad_dot", "grad_cos", "cg", "lissa", "lissa_h", "trak", "ekfac", "datainf",
                               "generalized_if"}


def test_inputs_not_matching_the_model_name_train_or_test():
    model, train, test = _mlp(classes=3), _data(N, classes=3), _data(M, seed=2, classes=3)
    with pytest.raises(ValueError, match=r"test\[0\] \(inputs\): the model rejects a sample of shape \(2,\)"):
        fk.attribute("cg", model, "cross_entropy", train, (test[0][:, :2], test[1]))
    with pytest.raises(TypeError, match=r"train: inputs: expected dtype torch.float64 .* got torch.float32"):
        fk.attribute("grad_dot", model, "cross_entropy", (train[0].float(), train[1]), test)
    bad = test[1].clone()
    bad[4] = 3  # past the 3 classes, and not in the first sample: every target is checked
    with pytest.raises(ValueError, match=r"test: targets: expected class indices in \[0, 3\)"):
        fk.attribute("grad_dot", model, "cross_entropy", train, (test[0], bad))
    with pytest.raises(TypeError, match="train: targets: expected dtype"):
        fk.attribute("trak", model, "cross_entropy", (train[0], train[1].double()), test)
    with pytest.raises(ValueError, match="train: targets: expected 40 samples"):
        fk.self_influence("grad_dot", model, "cross_entropy", (train[0], train[1][:-1]))
    with pytest.raises(ValueError, match="train: model_out: MSETask needs one output per sample"):
        fk.attribute("grad_dot", model, "mse", _data(N), _data(M, seed=2))
    training = model.train()
    assert fk.attribute("grad_dot", training, "cross_entropy", train, test).dtype == torch.float64
    assert training.training  # the one-sample probe ran in eval mode and left the mode as it was


def test_seeds_reach_the_estimators_and_are_bounded():
    """EK-FAC's sampled curvature takes its seed through attribute(); a seed outside [0, 2^64) is a
    named error everywhere (it overflowed inside torch's generator)."""
    model, train, test = _mlp(), _data(N), _data(M, seed=2)
    kw = dict(curvature="sampled", damping=0.1)
    a, b = (fk.attribute("ekfac", model, "mse", train, test, seed=s, **kw) for s in (0, 1))
    assert not torch.equal(a, b) and torch.equal(a, fk.attribute("ekfac", model, "mse", train, test, **kw))
    for method in ("ekfac", "lissa", "trak", "datainf"):
        with pytest.raises(ValueError, match=r"seed: expected an integer <= 18446744073709551615"):
            fk.attribute(method, model, "mse", train, test, seed=2**64)
    with pytest.raises(ValueError, match=r"seed: expected an integer >= 0"):
        fk.lissa(fk.gn_hvp(model, "mse", *train), torch.randn(1, 49, dtype=torch.float64), 10, 10.0, 0.1,
                 seed=-1, max_growth=None)


@pytest.mark.parametrize("strategy", ["ekfac", "kfac"])
def test_ekfac_method_is_the_fitted_estimator(problem, strategy):
    model, task, train, test = problem
    out = fk.attribute("ekfac", model, task, train, test, strategy=strategy, damping=0.01, batch_size=16)
    # the model is float64: so must the estimator be (EKFAC's own default dtype is float32)
    est = fk.EKFAC(model, task, strategy=strategy, damping=0.01, dtype=torch.float64).fit(*train, batch_size=16)
    assert out.dtype == torch.float64
    assert rel(out, est.scores(*train, *test)) < 1e-12
    # with damping far above the curvature, (G + λI)^{-1} ≈ I/λ: the scores approach Grad-Dot / λ
    big = fk.attribute("ekfac", model, task, train, test, strategy=strategy, damping=1e4)
    assert rel(big * 1e4, fk.attribute("grad_dot", model, task, train, test)) < 1e-3
    # info: the λ each layer used, also the per-layer default
    sc = fk.attribute_scores("ekfac", model, task, train, test, strategy=strategy, batch_size=16)
    default = fk.EKFAC(model, task, strategy=strategy, dtype=torch.float64).fit(*train, batch_size=16)
    assert sc.info["damping"] == dict(zip(default.layer_names, map(float, default.damping_values)))


def test_ekfac_method_honours_backend_and_max_memory():
    model, train, test = _mlp(), _data(N), _data(M, seed=2)
    kw = dict(strategy="ekfac", damping=0.01, batch_size=16)
    # an unavailable backend is refused as by the other methods, not silently replaced
    missing = next((b for b in ("cuda", "triton") if backend_unavailable_reasons(b, "cpu")), None)
    if missing is not None:
        for method in ("grad_dot", "ekfac"):
            with pytest.raises(ValueError, match=f"backend='{missing}' cannot run"):
                fk.attribute(method, model, "mse", train, test, backend=missing)
    assert rel(fk.attribute("ekfac", model, "mse", train, test, backend="torch", **kw),
               fk.attribute("ekfac", model, "mse", train, test, **kw)) < 1e-12
    # max_memory bounds the fit's (a, s) cache: with 1 byte the correction pass reads the data again
    calls = []
    # differentiated forwards only: the capture's no-grad probe forwards (two samples) do not read the data
    hook = model[0].register_forward_hook(lambda *_: calls.append(1) if torch.is_grad_enabled() else None)
    try:
        cached = fk.attribute("ekfac", model, "mse", train, test, **kw)
        n_cached = len(calls)
        again = fk.attribute("ekfac", model, "mse", train, test, max_memory=1, **kw)
    finally:
        hook.remove()
    assert len(calls) - 2 * n_cached == N // 16 + 1  # one more pass over the 3 training batches
    assert rel(again, cached) < 1e-12


def test_non_finite_samples_named_in_their_set():
    """A sample whose gradient overflows is named by its index in the training set (also through
    DataInf's reference subsample) or as a test sample; the error survives pickling (worker pools)."""
    import pickle

    from fimoda_kernels.grads import SampleError

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 1))
    x, y = torch.randn(12, 3), torch.randn(12)
    y_bad = y.clone()
    y_bad[7] = 3e38  # float32: the loss gradient 2(f − y) overflows
    ref = torch.randperm(12, generator=torch.Generator().manual_seed(0))[:8]
    assert 7 in ref.tolist()
    with pytest.raises(SampleError, match=r"^inputs, targets: .* for sample 7 ") as err:
        fk.attribute("datainf", model, "mse", (x, y_bad), (x[:3], y[:3]), reference=8, seed=0)
    assert str(pickle.loads(pickle.dumps(err.value))) == str(err.value)
    with pytest.raises(SampleError, match=r"^test inputs, targets: .* for sample 1 "):
        fk.attribute("cg", model, "mse", (x, y), (x[6:9], y_bad[6:9]), damping=0.1)


def test_datainf_refuses_layers_that_differ_between_its_sets():
    """DataInf pairs the reference and test blocks layer by layer. A model that reorders its batch is
    captured in a set of one sample but not in larger ones: its blocks were paired across different
    layers (a misleading width error, or wrong numbers for equal widths); now a clear error."""

    torch.manual_seed(0)
    model = Reordering(3).double()
    x, y = _data(12)
    x[0, 0] = 10.0  # moves when sorted: the capture of the training batches sees it
    with pytest.raises(RuntimeError, match="captured layers differ between the test and reference sets"):
        fk.attribute("datainf", model, "mse", (x, y), (x[:1], y[:1]))
    out = fk.attribute("datainf", model, "mse", (x, y), (x[:3], y[:3]))  # sample 0 in both sets: same layers
    assert out.shape == (12, 3) and bool(torch.isfinite(out).all())


SELF_OPTIONS = {"cg": dict(damping=0.05, tol=1e-12), "lissa": dict(damping=0.5, depth=300, scale="auto"),
                "lissa_h": dict(damping=2.0, depth=300, scale="auto"), "trak": dict(proj_dim=16),
                "ekfac": dict(damping=0.01, batch_size=7), "datainf": dict(reference=15),
                "generalized_if": dict(damping=0.05, tol=1e-12),
                "generalized_if_eq16": dict(damping=0.05, tol=1e-12, form="eq16")}


@pytest.mark.parametrize("name", list(SELF_OPTIONS))
def test_self_influence_is_the_diagonal_of_the_scores(problem, name, monkeypatch):
    """Each method's self-influence runs training chunks as their own test sets (memory of a chunk,
    not the n × n scores nor n × p gradients at once: it never calls the scoring path with the
    training set as test set); with a budget of a few samples per chunk it equals the diagonal of
    the full score matrix."""
    from fimoda_kernels import methods

    model, task, train, _ = problem
    method, opts = name.removesuffix("_eq16"), SELF_OPTIONS[name]
    full = fk.attribute(method, model, task, train, train, **opts)
    cls, _, self_fn = methods._METHODS[method]
    monkeypatch.setitem(methods._METHODS, method, (cls, lambda *a: pytest.fail("n × n scores computed"), self_fn))
    p = sum(t.numel() for t in model.parameters())
    # chunks of 3 training points for the solvers (9 for EK-FAC): uneven, 40 = 13·3 + 1
    sc = fk.attribute_scores(method, model, task, train, self_influence=True, max_memory=27 * p * 8, **opts)
    small = sc.self_influence
    assert small.shape == (N,) and small.dtype == full.dtype
    solver = sc.info.get("cg", sc.info.get("lissa"))
    if solver is not None:  # per-row solver info joined over the chunks
        assert solver["final_residual" if "cg" in sc.info else "final_norms"].shape == (N,)
    assert rel(small, full.diagonal()) < (1e-6 if method.startswith("lissa") else 1e-9)


def test_lissa_self_influence_climbs_the_scale_ladder_for_every_chunk():
    """With scale="auto" the first chunk picks a scale; a later chunk that diverges there makes every
    chunk run again one rung higher, so the result is the batched call's (it failed before)."""
    m = nn.Linear(2, 1, bias=False).double().eval()
    with torch.no_grad():
        m.weight.zero_()
    x = torch.tensor([[0, 1.], [0, 1.2], [0, 0.9], [30., 0]], dtype=torch.float64)  # the last needs s ≥ 1000
    y = torch.ones(4, 1, dtype=torch.float64)
    opts = dict(scale="auto", depth=50, batch_size=1, damping=1e-3)
    full = fk.attribute_scores("lissa", m, "mse", (x, y), (x, y), **opts)
    one = fk.attribute_scores("lissa", m, "mse", (x, y), self_influence=True, max_memory=1, **opts)  # one per chunk
    assert full.info["lissa"]["scale"] == one.info["lissa"]["scale"] == 1000
    assert rel(one.self_influence, full.scores.diagonal()) < 1e-12


def test_datainf_parameter_blocks_on_conv_bias_free_and_uncovered_layers():
    """blocks="parameter" on a Conv2d with bias (T > 1 positions), a bias-free Linear and a LayerNorm
    (uncovered: materialized gradients): each parameter tensor its own block, names as in the model."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Tanh(), nn.Flatten(), nn.LayerNorm(8),
                          nn.Linear(8, 1, bias=False)).double().eval()
    train = (randn(15, 1, 4, 4, dtype=torch.float64, seed=4), randn(15, dtype=torch.float64, seed=5))
    test = (randn(4, 1, 4, 4, dtype=torch.float64, seed=6), randn(4, dtype=torch.float64, seed=7))
    sc = fk.attribute_scores("datainf", model, "mse", train, test, blocks="parameter")
    g_tr, g_te = per_sample_grads(model, "mse", *train), per_sample_grads(model, "mse", *test)
    ref, col = 0, 0
    for name, p in model.named_parameters():
        gl, gz = g_tr[:, col:col + p.numel()], g_te[:, col:col + p.numel()]
        col += p.numel()
        sq, lam = (gl ** 2).sum(1), float((gl ** 2).mean(1).mean()) / 10
        assert sc.info["lambdas"][name] == pytest.approx(lam, rel=1e-10)
        K = gl @ gz.T
        ref = ref + (K - (gl @ gl.T) @ (K / (lam + sq)[:, None]) / 15) / lam
    assert sorted(sc.info["lambdas"]) == sorted(n for n, _ in model.named_parameters())
    assert rel(sc.scores, ref) < 1e-10


def test_datainf_parameter_blocks_of_a_one_layer_model_are_named_as_its_parameters():
    model = nn.Linear(3, 1).double().eval()
    sc = fk.attribute_scores("datainf", model, "mse", _data(12), _data(3, seed=2), blocks="parameter")
    assert sorted(sc.info["lambdas"]) == ["bias", "weight"]


def test_meta_inputs_are_named():
    model, train = _mlp(), _data(6)
    with pytest.raises(ValueError, match="train: targets are on the meta device"):
        fk.attribute("grad_dot", model, "mse", (train[0], train[1].to("meta")), train)
    with pytest.raises(ValueError, match="test: inputs are on the meta device"):
        fk.attribute("grad_dot", model, "mse", train, (train[0].to("meta"), train[1]))
