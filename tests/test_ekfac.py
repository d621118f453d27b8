"""EKFAC (fimoda_kernels/ekfac.py) vs a dense float64 reference that builds the Kronecker
eigenbasis Q_S ⊗ Q_A and the curvature (p_l × p_l per layer) explicitly."""
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fimoda_kernels import EKFAC, get_task, kfac_eigenvalues, param_layout, per_sample_grads


class SeqModel(nn.Module):
    """Two Linear layers applied at T = 3 positions, outputs summed over positions."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 5), nn.Linear(5, 1)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x))).sum(1)


def _mlp(out=3):
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, out))


def _conv():
    return nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(3 * 5 * 5, 3))


def _data(kind, n, seed):
    g = torch.Generator().manual_seed(seed)
    if kind == "mlp":
        x = torch.randn(n, 4, generator=g, dtype=torch.float64)
    elif kind == "conv":
        x = torch.randn(n, 2, 5, 5, generator=g, dtype=torch.float64)
    else:
        x = torch.randn(n, 3, 4, generator=g, dtype=torch.float64)
    y = (torch.randn(n, generator=g, dtype=torch.float64) if kind == "seq"
         else torch.randint(0, 3, (n,), generator=g))
    return x, y


def _model(kind):
    torch.manual_seed(0)
    m = {"mlp": _mlp, "conv": _conv, "seq": SeqModel}[kind]().double().eval()
    return m, ("mse" if kind == "seq" else "cross_entropy")


# ----------------------------------------------------------------------------- dense reference

def _layer_inputs_and_grads(model, task, x, y, curvature):
    """(a, s) per Linear/Conv2d layer by forward hooks and autograd.grad on the layer outputs."""
    mods = [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    ins, outs = {}, {}

    def record(mod, i, o, name):
        ins[name], outs[name] = i[0], o

    hooks = [m.register_forward_hook(lambda mod, i, o, n=n: record(mod, i, o, n)) for n, m in mods]
    out = model(x)
    for h in hooks:
        h.remove()
    if curvature == "gn":
        f = task.output(out, y)
        total = (f * task.d2loss(f.detach(), y).sqrt()).sum()
    else:
        total = task.loss(out, y).sum()
    grads = torch.autograd.grad(total, [outs[n] for n, _ in mods])
    res = []
    for (n, m), g in zip(mods, grads):
        a = ins[n].detach()
        if isinstance(m, nn.Conv2d):
            a = F.unfold(a, m.kernel_size, m.dilation, m.padding, m.stride).transpose(1, 2)
            s = g.flatten(2).transpose(1, 2)
        else:
            a, s = a.reshape(a.shape[0], -1, a.shape[-1]), g.reshape(g.shape[0], -1, g.shape[-1])
        res.append((n, torch.cat([a, torch.ones_like(a[..., :1])], -1), s))
    return res


def _layer_grads(model, task, x, y, wrt, scale=None):
    """Per-sample gradient matrices [n, d_out, d_in + 1] per layer from torch.func per-sample gradients."""
    G = per_sample_grads(model, task, x, y, wrt=wrt)
    if scale is not None:
        G = G * scale[:, None]
    slots = {s.name: s for s in param_layout(model)}
    out = []
    for n, m in model.named_modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            w, b = slots[f"{n}.weight"], slots[f"{n}.bias"]
            W = G[:, w.offset:w.offset + w.numel].reshape(x.shape[0], m.weight.shape[0], -1)
            out.append(torch.cat([W, G[:, b.offset:b.offset + b.numel, None]], 2))
    return out


def dense_scores(model, task, curvature, strategy, damping, fit, train, test):
    task = get_task(task)
    x, y = fit
    acts = _layer_inputs_and_grads(model, task, x, y, curvature)
    if curvature == "gn":
        f = task.output(model(x), y).detach()
        curv = _layer_grads(model, task, x, y, "output", task.d2loss(f, y).sqrt())
    else:
        curv = _layer_grads(model, task, x, y, "loss")
    g_tr, g_te = _layer_grads(model, task, *train, "loss"), _layer_grads(model, task, *test, "loss")
    total, Lams = 0, []
    for (name, a, s), Gc, Gtr, Gte in zip(acts, curv, g_tr, g_te):
        N = a.shape[0]
        A = torch.einsum("nti,ntj->ij", a, a) / N
        S = torch.einsum("nti,ntj->ij", s, s) / N
        lam_A, Q_A = torch.linalg.eigh(A)
        lam_S, Q_S = torch.linalg.eigh(S)
        Q = torch.kron(Q_S, Q_A)  # acts on row-major vec(G) of G [d_out, d_in]
        if strategy == "ekfac":
            Lam = ((Gc.flatten(1) @ Q) ** 2).mean(0)
        else:
            Lam = torch.kron(lam_S, lam_A)
        lam = 0.1 * Lam.mean() if damping is None else damping
        H = Q @ torch.diag(Lam + lam) @ Q.T
        total = total + Gtr.flatten(1) @ torch.linalg.solve(H, Gte.flatten(1).T)
        Lams.append(Lam.reshape(S.shape[0], A.shape[0]))
    return total, Lams


def _rel(a, b):
    return float((a.double() - b).norm() / b.norm())


@pytest.mark.parametrize("kind", ["mlp", "conv", "seq"])
@pytest.mark.parametrize("curvature", ["gn", "empirical"])
@pytest.mark.parametrize("strategy", ["ekfac", "kfac"])
def test_matches_dense_reference(kind, curvature, strategy):
    model, task = _model(kind)
    fit, train, test = _data(kind, 37, 1), _data(kind, 9, 2), _data(kind, 5, 3)
    damping = None if strategy == "ekfac" else 1e-3
    ek = EKFAC(model, task, curvature=curvature, strategy=strategy, damping=damping, dtype=torch.float64)
    ek.fit(*fit, batch_size=10)
    out = ek.scores(*train, *test, batch_size=4)
    ref, Lams = dense_scores(model, task, curvature, strategy, damping, fit, train, test)
    assert out.shape == (9, 5) and out.dtype == torch.float64
    assert _rel(out, ref) < 1e-9
    assert _rel(ek.scores(*train, *test, form="factored"), ref) < 1e-9  # "auto" may pick materialized chunks
    assert max(_rel(L, R) for L, R in zip(ek.eigenvalues, Lams)) < 1e-9
    # float32 factors and scores stay close to the float64 truth
    ek32 = EKFAC(model.float(), task, curvature=curvature, strategy=strategy, damping=damping).fit(
        fit[0].float(), fit[1].float() if kind == "seq" else fit[1], batch_size=16)
    to32 = lambda d: (d[0].float(), d[1].float() if kind == "seq" else d[1])  # noqa: E731
    out32 = ek32.scores(*to32(train), *to32(test))
    model.double()
    assert out32.dtype == torch.float32 and _rel(out32, ref) < 1e-3


def test_kfac_uses_kronecker_eigenvalues():
    model, task = _model("mlp")
    ek = EKFAC(model, task, strategy="kfac", dtype=torch.float64).fit(*_data("mlp", 30, 1))
    for (_, lam_A, _, lam_S), L in zip(ek.eigenbases, ek.eigenvalues):
        assert torch.allclose(L, kfac_eigenvalues(lam_A, lam_S))
    full = EKFAC(model, task, strategy="ekfac", dtype=torch.float64).fit(*_data("mlp", 30, 1))
    assert not torch.allclose(full.eigenvalues[0], ek.eigenvalues[0])  # correlated a, s: they differ


def test_sampled_curvature_matches_its_expectation():
    """Sampled labels are seeded (same seed → same factors) and their Fisher matches the expectation:
    regression S_last = E[(2(f − y))²] = 2 (the GN value); classification S_last = mean_i diag(p_i) − p_i p_iᵀ."""
    torch.manual_seed(0)
    reg = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).double()
    x = torch.randn(4, 3, dtype=torch.float64).repeat(1500, 1)
    y = torch.randn(x.shape[0], dtype=torch.float64)
    e1 = EKFAC(reg, "mse", curvature="sampled", seed=3, dtype=torch.float64).fit(x, y, batch_size=2000)
    e2 = EKFAC(reg, "mse", curvature="sampled", seed=3, dtype=torch.float64).fit(x, y, batch_size=2000)
    e3 = EKFAC(reg, "mse", curvature="sampled", seed=4, dtype=torch.float64).fit(x, y, batch_size=2000)
    assert torch.equal(e1.eigenvalues[1], e2.eigenvalues[1]) and not torch.equal(e1.eigenvalues[1], e3.eigenvalues[1])
    assert abs(float(e1.factors[1][1]) - 2.0) < 0.1
    gn = EKFAC(reg, "mse", curvature="gn", dtype=torch.float64).fit(x, y, batch_size=2000)
    assert float(gn.factors[1][1]) == pytest.approx(2.0, rel=1e-12)

    clf = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    yc = torch.randint(0, 3, (x.shape[0],))
    ek = EKFAC(clf, "cross_entropy", curvature="sampled", dtype=torch.float64).fit(x, yc, batch_size=2000)
    p = torch.softmax(clf(x[:4]), 1).detach()
    expect = (torch.diag_embed(p) - p[:, :, None] * p[:, None, :]).mean(0)
    assert _rel(ek.factors[1][1], expect) < 0.05
    emp = EKFAC(clf, "cross_entropy", curvature="empirical", dtype=torch.float64).fit(x, yc, batch_size=2000)
    assert _rel(emp.factors[1][1], expect) > 0.1  # the empirical Fisher is a different matrix


@pytest.mark.parametrize("kind,curvature", [("mlp", "gn"), ("mlp", "sampled"), ("conv", "sampled")])
def test_cached_second_pass_equals_recomputed(kind, curvature):
    """The correction pass on the first pass's cached (a, s) — gradient matrices for the conv layer —
    equals a recomputed second pass (the sampling generator restarts, so the sampled labels are the
    same too), and a too-small cache falls back."""
    model, task = _model(kind)
    x, y = _data(kind, 30, 1)
    fits = [EKFAC(model, task, curvature=curvature, dtype=torch.float64).fit(x, y, batch_size=8, cache_bytes=c)
            for c in (2**20, 0, 3000)]
    for other in fits[1:]:
        assert all(torch.allclose(L, M, rtol=1e-12, atol=0) for L, M in zip(fits[0].eigenvalues, other.eigenvalues))


def test_dataloader_equals_tensors():
    model, task = _model("conv")
    x, y = _data("conv", 23, 1)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)
    a = EKFAC(model, task, dtype=torch.float64).fit(loader)
    b = EKFAC(model, task, dtype=torch.float64).fit(x, y, batch_size=5)
    assert all(torch.allclose(L, M) for L, M in zip(a.eigenvalues, b.eigenvalues))
    s1 = a.scores(loader, None, x[:4], y[:4])
    assert torch.allclose(s1, b.scores(x, y, x[:4], y[:4]))
    assert s1.shape == (23, 4)


def test_save_load_round_trip(tmp_path):
    model, task = _model("seq")
    fit, train, test = _data("seq", 20, 1), _data("seq", 6, 2), _data("seq", 3, 3)
    ek = EKFAC(model, task, curvature="empirical", damping=0.01, seed=5, dtype=torch.float64).fit(*fit)
    path = tmp_path / "ekfac.pt"
    ek.save(path)
    back = EKFAC.load(path, model, task)
    assert (back.curvature, back.strategy, back.damping, back.seed, back.dtype) == ("empirical", "ekfac", 0.01, 5,
                                                                                   torch.float64)
    assert back.layer_names == ek.layer_names and back.damping_values == ek.damping_values
    for x, y in zip(ek.factors + ek.eigenbases + [tuple(ek.eigenvalues)],
                    back.factors + back.eigenbases + [tuple(back.eigenvalues)]):
        assert all(torch.equal(u, v) for u, v in zip(x, y))
    assert torch.equal(back.scores(*train, *test), ek.scores(*train, *test))
    other = SeqModel().double()
    other.fc1 = nn.Linear(4, 6).double()
    with pytest.raises(ValueError, match=r"layer 'fc1' has \(d_in incl. bias, d_out\) = \(5, 6\)"):
        EKFAC.load(path, other, task)
    with pytest.raises(ValueError, match="expected a Linear/Conv2d layer 'fc1'"):
        EKFAC.load(path, _mlp().double(), task)


def test_nan_input_names_layer_and_batch():
    model, task = _model("mlp")
    x, y = _data("mlp", 40, 1)
    x[25, 2] = float("nan")  # batch 2 at batch_size 10
    with pytest.raises(ValueError, match=r"batch 2: inputs: expected finite values, got NaN or Inf at sample 5"):
        EKFAC(model, task, dtype=torch.float64).fit(x, y, batch_size=10)


def test_uncovered_parameters_warn_once():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.LayerNorm(5), nn.Linear(5, 3)).double()
    x, y = _data("mlp", 20, 1)
    ek = EKFAC(model, "cross_entropy", dtype=torch.float64)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        ek.fit(x, y, batch_size=5)
        ek.scores(x, y, x[:2], y[:2])
    msgs = [str(w.message) for w in rec if "left out" in str(w.message)]
    assert len(msgs) == 1 and "1.weight" in msgs[0] and "1.bias" in msgs[0]


def test_argument_errors():
    model, task = _model("mlp")
    with pytest.raises(ValueError, match="curvature"):
        EKFAC(model, task, curvature="hessian")
    with pytest.raises(ValueError, match="strategy"):
        EKFAC(model, task, strategy="diag")
    with pytest.raises(ValueError, match="damping"):
        EKFAC(model, task, damping=-1)
    with pytest.raises(RuntimeError, match="call fit"):
        EKFAC(model, task).scores(*_data("mlp", 3, 1), *_data("mlp", 2, 2))
    x, y = _data("mlp", 5, 1)
    with pytest.raises(ValueError, match="targets"):
        EKFAC(model, task).fit(x, y[:3])
    with pytest.raises(ValueError, match="batch_size"):
        EKFAC(model, task).fit(x, y, batch_size=0)

    class Custom(get_task("mse").__class__.__mro__[1]):  # a bare Task subclass
        pass

    with pytest.raises(ValueError, match="sampled"):
        EKFAC(model, Custom(), curvature="sampled")
    assert math.isfinite(EKFAC(model, task, dtype=torch.float64).fit(x, y).damping_values[0])


def test_fit_cache_keeps_the_smaller_form_in_bytes():
    """Between the passes a layer is kept as per-sample gradient matrices only when they take fewer
    bytes than (a, s): 12 against 14 values here, but not once the matrices are float64 and a, s float32."""
    from fimoda_kernels.ekfac import _compact

    a, s = torch.randn(5, 2, 4), torch.randn(5, 2, 3)
    kept = _compact(a, s, torch.float32)
    assert isinstance(kept, torch.Tensor) and kept.shape == (5, 3, 4)
    assert torch.allclose(kept, torch.einsum("nto,nti->noi", s, a))
    assert isinstance(_compact(a, s, torch.float64), tuple)
    assert isinstance(_compact(a[:, 0], s[:, 0], torch.float32), tuple)  # T = 1: the pair
