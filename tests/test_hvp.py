"""GN / true-Hessian operators vs the explicit matrices (torch.func.jacrev / hessian) in float64."""
import pytest
import torch
from curvature_helpers import data, dense_gn, dense_hessian, mlp, rel
from torch import nn

import fimoda_kernels as fk

N = 37


class ScaledMLP(nn.Module):
    """An MLP with a trainable parameter outside any Linear layer (forces the generic path)."""

    def __init__(self):
        super().__init__()
        self.net = mlp((4, 6, 2))
        self.gain = nn.Parameter(torch.tensor([1.3, 0.7], dtype=torch.float64))

    def forward(self, x):
        return self.net(x) * self.gain


CASES = {
    "mse": (lambda: mlp((5, 7, 6, 1)), 5, "mse"),
    "ce": (lambda: mlp((4, 6, 3)), 4, "cross_entropy"),
    "generic_ce": (ScaledMLP, 4, "cross_entropy"),
}


@pytest.fixture(params=list(CASES))
def case(request):
    make, d_in, task = CASES[request.param]
    model = make()
    x, y = data(N, d_in, task, classes=3 if request.param == "ce" else 2)
    return model, task, x, y


def _vectors(p, r=3, seed=5):
    return torch.randn(r, p, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_gn_matches_dense(case):
    model, task, x, y = case
    op = fk.gn_hvp(model, task, x, y)
    V = _vectors(op.num_params)
    G = dense_gn(model, task, x, y)
    assert op.num_params == G.shape[0] and op.num_samples == N and op.dtype == torch.float64
    assert rel(op(V), V @ G) < 1e-12
    idx = torch.tensor([0, 3, 3, 20, N - 1])  # a repeated index counts twice
    assert rel(op(V, batch=idx), V @ dense_gn(model, task, x, y, idx)) < 1e-12
    assert rel(op(V, batch=slice(5, 17)), V @ dense_gn(model, task, x, y, torch.arange(5, 17))) < 1e-12


def test_hessian_matches_dense(case):
    model, task, x, y = case
    op = fk.hessian_hvp(model, task, x, y)
    V = _vectors(op.num_params, seed=6)
    assert op.kind == "hessian" and op.path == ("generic" if isinstance(model, ScaledMLP) else "linear")
    assert rel(op(V), V @ dense_hessian(model, task, x, y)) < 1e-12
    idx = [1, 2, 30]
    assert rel(op(V, batch=idx), V @ dense_hessian(model, task, x, y, torch.tensor(idx))) < 1e-12


def test_path_selection(case):
    model, task, x, y = case
    op = fk.gn_hvp(model, task, x, y)
    if isinstance(model, ScaledMLP):
        assert op.path == "generic" and "gain" in op.path_reason
        with pytest.raises(ValueError, match="linear=True.*gain"):
            fk.gn_hvp(model, task, x, y, linear=True)
    else:
        assert op.path == "linear" and "path='linear'" in repr(op)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_linear_path_equals_generic(dtype):
    model = mlp((6, 9, 8, 1), dtype=dtype, act=nn.ReLU)
    x, y = data(50, 6, dtype=dtype)
    fast, slow = fk.gn_hvp(model, "mse", x, y), fk.gn_hvp(model, "mse", x, y, linear=False)
    assert fast.path == "linear" and slow.path == "generic"
    V = _vectors(fast.num_params, r=4).to(dtype)
    tol = 1e-13 if dtype == torch.float64 else 2e-6
    assert rel(fast(V), slow(V)) < tol
    assert rel(fast(V, batch=[4, 9, 9, 49]), slow(V, batch=[4, 9, 9, 49])) < tol


def test_linear_path_layer_without_bias():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(3, 5, bias=False), nn.Tanh(), nn.Linear(5, 1)).double().eval()
    x, y = data(20, 3)
    op = fk.gn_hvp(model, "mse", x, y)
    V = _vectors(op.num_params)
    assert op.path == "linear" and rel(op(V), V @ dense_gn(model, "mse", x, y)) < 1e-12


def test_linear_path_with_an_in_place_activation():
    """ReLU(inplace=True) rewrites the first Linear's output; the captured GN path is still exact."""
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(3, 6), nn.ReLU(inplace=True), nn.Linear(6, 1)).double().eval()
    x, y = data(20, 3)
    op = fk.gn_hvp(model, "mse", x, y)
    V = _vectors(op.num_params)
    assert op.path == "linear" and rel(op(V), V @ dense_gn(model, "mse", x, y)) < 1e-12


def test_chunking_under_a_small_budget():
    model = mlp((5, 7, 6, 1))
    x, y = data(N, 5)
    V = _vectors(sum(p.numel() for p in model.parameters()), r=5)
    G, H = dense_gn(model, "mse", x, y), dense_hessian(model, "mse", x, y)
    tiny = fk.gn_hvp(model, "mse", x, y, max_memory=4096)  # the captured a, s do not fit: generic, chunked
    assert tiny.path == "generic" and "max_memory" in tiny.path_reason
    assert rel(tiny(V), V @ G) < 1e-12
    assert rel(fk.hessian_hvp(model, "mse", x, y, max_memory=4096)(V), V @ H) < 1e-12
    small = fk.gn_hvp(model, "mse", x, y, max_memory=20_000)  # linear path, many sample chunks per call
    assert small.path == "linear" and rel(small(V), V @ G) < 1e-12


def test_gn_and_hessian_differ_where_they_should():
    """Non-zero residuals (random targets, a non-linear model): H = G + (1/N) Σ φ'_i ∇²f_i ≠ G.
    A model linear in θ (no hidden layer): ∇²f = 0 and H = G exactly."""
    model = mlp((5, 7, 6, 1))
    x, y = data(N, 5)
    V = _vectors(sum(p.numel() for p in model.parameters()))
    gn, hs = fk.gn_hvp(model, "mse", x, y), fk.hessian_hvp(model, "mse", x, y)
    assert rel(gn(V), hs(V)) > 1e-2
    lin = mlp((5, 1))
    V = _vectors(6)
    assert rel(fk.gn_hvp(lin, "mse", x, y)(V), fk.hessian_hvp(lin, "mse", x, y)(V)) < 1e-13


def test_shapes_and_dtypes():
    model = mlp((5, 7, 1))
    x, y = data(N, 5)
    op = fk.gn_hvp(model, "mse", x, y)
    V = _vectors(op.num_params, r=2)
    one = op(V[1])
    assert one.shape == (op.num_params,) and torch.allclose(one, op(V)[1], rtol=1e-12, atol=0)
    out32 = op(V.float())
    assert out32.dtype == torch.float32 and rel(out32, op(V)) < 1e-6
    assert op(V[:0]).shape == (0, op.num_params)
    assert op.device == torch.device("cpu")


def test_validation():
    model = mlp((5, 7, 1))
    x, y = data(N, 5)
    op = fk.gn_hvp(model, "mse", x, y)
    p = op.num_params
    with pytest.raises(ValueError, match=rf"V: expected \[r, {p}\]"):
        op(torch.zeros(2, p + 1, dtype=torch.float64))
    with pytest.raises(TypeError, match="V: expected a floating dtype"):
        op(torch.zeros(2, p, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"batch: expected indices in \[0, 37\)"):
        op(torch.zeros(1, p, dtype=torch.float64), batch=[0, 37])
    with pytest.raises(ValueError, match="batch: expected at least one"):
        op(torch.zeros(1, p, dtype=torch.float64), batch=[])
    with pytest.raises(TypeError, match=r"batch\[1\]: expected an integer, got float 1.9"):
        op(torch.zeros(1, p, dtype=torch.float64), batch=[0, 1.9])
    with pytest.raises(ValueError, match="linear=True: the fast hessian path .* ScaledMLP, not an nn.Sequential"):
        fk.hessian_hvp(ScaledMLP(), "cross_entropy", x[:, :4], (y > 0).long(), linear=True)
    with pytest.raises(ValueError, match="linear=True: .*2-D inputs"):
        fk.hessian_hvp(model, "mse", x[:, None, :].expand(-1, 2, -1), y, linear=True)
    with pytest.raises(ValueError, match="kind"):
        fk.HVPOperator(model, "mse", x, y, "fisher")
    with pytest.raises(ValueError, match="targets"):
        fk.gn_hvp(model, "mse", x, y[:-1])
    with pytest.raises(TypeError, match="max_memory"):
        fk.gn_hvp(model, "mse", x, y, max_memory=1.5)


@pytest.mark.parametrize("r", [3, 64])
@pytest.mark.parametrize("max_memory", [2**30, 40_000])
def test_linear_path_forms_and_chunks(r, max_memory):
    """Per layer the factored or the materialized form (r = 3: the 2→60 layer materialized, the 60→1
    factored; r = 64: all materialized as one flat block), one or several sample chunks."""
    model = mlp((2, 60, 1))
    x, y = data(30, 2)
    op = fk.gn_hvp(model, "mse", x, y, max_memory=max_memory)
    assert op.path == "linear"
    V = _vectors(op.num_params, r=r, seed=r)
    assert rel(op(V), V @ dense_gn(model, "mse", x, y)) < 1e-12
    idx = torch.tensor([2, 2, 7, 29, 11])
    assert rel(op(V, batch=idx), V @ dense_gn(model, "mse", x, y, idx)) < 1e-12


class _ShiftedMSE(fk.MSETask):
    """Not exactly MSETask: the loss derivatives in the outputs come from torch.func, not closed forms."""

    def loss(self, model_out, targets):
        return super().loss(model_out, targets) + 0.5 * model_out.reshape(-1) ** 4


def _h_model(kind, out):
    torch.manual_seed(4)
    if kind == "no_bias":
        return nn.Sequential(nn.Linear(5, 7, bias=False), nn.GELU(), nn.Linear(7, out, bias=False)).double().eval()
    if kind == "final_activation":  # an activation after the last Linear (h_L = σ(z_L) is the output)
        return nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, out), nn.Sigmoid()).double().eval()
    if kind == "identity":
        return nn.Sequential(nn.Linear(5, 6), nn.Identity(), nn.SiLU(), nn.Linear(6, 4), nn.Linear(4, out)).double().eval()
    return mlp((5, 8, 6, out), act=kind)


@pytest.mark.parametrize("kind", [nn.ReLU, nn.Tanh, nn.Sigmoid, nn.SiLU, nn.GELU, nn.LeakyReLU,
                                  "no_bias", "final_activation", "identity"])
@pytest.mark.parametrize("task", ["mse", "cross_entropy", "custom"])
def test_hessian_mlp_path_matches_dense(kind, task):
    """The R-operator path against the explicit Hessian: every supported activation (σ'' ≠ 0 for
    Tanh/Sigmoid/SiLU/GELU), MSE / cross-entropy closed forms and a Task without one."""
    model = _h_model(kind, 3 if task == "cross_entropy" else 1)
    tk = _ShiftedMSE() if task == "custom" else task
    x, y = data(N, 5, "mse" if task == "custom" else task, scale=1.5)
    op = fk.hessian_hvp(model, tk, x, y)
    assert op.path == "linear" and "R-operator" in op.path_reason
    V = _vectors(op.num_params, r=4, seed=11)
    assert rel(op(V), V @ dense_hessian(model, tk, x, y)) < 1e-12
    idx = torch.tensor([0, 3, 3, 20, N - 1])  # a repeated index counts twice
    assert rel(op(V, batch=idx), V @ dense_hessian(model, tk, x, y, idx)) < 1e-12


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_hessian_mlp_path_equals_generic(dtype):
    model = mlp((6, 9, 8, 1), dtype=dtype, act=nn.Tanh)
    x, y = data(50, 6, dtype=dtype)
    fast, slow = fk.hessian_hvp(model, "mse", x, y), fk.hessian_hvp(model, "mse", x, y, linear=False)
    assert fast.path == "linear" and slow.path == "generic" and slow.path_reason == "linear=False"
    V = _vectors(fast.num_params, r=5).to(dtype)
    tol = 1e-13 if dtype == torch.float64 else 2e-6
    assert rel(fast(V), slow(V)) < tol
    assert rel(fast(V, batch=slice(3, 40)), slow(V, batch=slice(3, 40))) < tol
    assert rel(fast(V[2]), slow(V)[2]) < tol  # one vector


@pytest.mark.parametrize("max_memory", [2_000, 60_000])
def test_hessian_mlp_path_sample_chunks(max_memory):
    """Tiny budgets: one sample per chunk, or a few chunks; every chunk adds into the output."""
    model = mlp((5, 7, 6, 1), act=nn.SiLU)
    x, y = data(N, 5)
    op = fk.hessian_hvp(model, "mse", x, y, max_memory=max_memory)
    assert op.path == "linear"
    V = _vectors(op.num_params, r=7)
    assert rel(op(V), V @ dense_hessian(model, "mse", x, y)) < 1e-12


@pytest.mark.parametrize("kind", ["gn", "hessian"])
def test_out_and_workspace_reuse(kind):
    """``out=`` receives the product (also across dtypes and for one vector); the reused workspace
    gives the same results whatever the sizes of the calls before."""
    model = mlp((5, 7, 6, 1), act=nn.Tanh)
    x, y = data(N, 5)
    make = fk.gn_hvp if kind == "gn" else fk.hessian_hvp
    op, fresh = make(model, "mse", x, y), make(model, "mse", x, y)
    assert op.path == "linear"
    p = op.num_params
    V3, V64 = _vectors(p, r=3, seed=1), _vectors(p, r=64, seed=2)
    want3, want64 = fresh(V3), fresh(V64, batch=[1, 2, 2, 30])
    for _ in range(2):
        assert torch.equal(op(V3), want3)
        assert torch.equal(op(V64, batch=[1, 2, 2, 30]), want64)
    buf = torch.empty(3, p, dtype=torch.float64)
    assert op(V3, out=buf) is buf and torch.equal(buf, want3)
    one = torch.empty(p, dtype=torch.float64)
    assert op(V3[1], out=one) is one and torch.allclose(one, want3[1], rtol=1e-13, atol=0)
    buf32 = torch.empty(3, p, dtype=torch.float32)
    assert op(V3.float(), out=buf32) is buf32 and rel(buf32, want3) < 1e-6
    slow = make(model, "mse", x, y, linear=False)  # the generic path adds into out after zeroing it
    buf.fill_(float("nan"))
    assert slow(V3, out=buf) is buf and rel(buf, want3) < 1e-12
    with pytest.raises(ValueError, match=r"out: expected a contiguous tensor of shape \(3, "):
        op(V3, out=torch.empty(3, p + 1, dtype=torch.float64))
    with pytest.raises(ValueError, match="not contiguous"):
        op(V3, out=torch.empty(p, 3, dtype=torch.float64).T)
    with pytest.raises(TypeError, match="out: expected dtype"):
        op(V3, out=torch.empty(3, p, dtype=torch.float32))


def test_fast_paths_with_inplace_activations_and_their_limits():
    """In-place activations take the MLP Hessian path; a pruned (reparametrized) or hooked Linear falls
    back to the generic path with the reason; out= may not share V's memory."""
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(5, 7), nn.ReLU(inplace=True), nn.Linear(7, 6), nn.SiLU(inplace=True),
                          nn.Linear(6, 1)).double().eval()
    x, y = data(N, 5)
    op = fk.hessian_hvp(model, "mse", x, y)
    V = _vectors(op.num_params)
    assert op.path == "linear" and rel(op(V), V @ dense_hessian(model, "mse", x, y)) < 1e-12
    with pytest.raises(ValueError, match="out: expected memory separate from V's"):
        op(V, out=V)

    pruned = mlp((5, 7, 1))
    from torch.nn.utils import prune

    prune.l1_unstructured(pruned[0], "weight", amount=0.3)
    h = fk.hessian_hvp(pruned, "mse", x, y)
    assert h.path == "generic" and "layer 0" in h.path_reason  # its pre-hook, or its non-parameter weight
    hooked = mlp((5, 7, 1))
    hooked[2].register_forward_hook(lambda m, i, o: o * 2)
    h = fk.hessian_hvp(hooked, "mse", x, y)
    assert h.path == "generic" and "forward hooks" in h.path_reason
    V = _vectors(h.num_params)
    assert rel(h(V), V @ dense_hessian(hooked, "mse", x, y)) < 1e-12


@pytest.mark.parametrize("kind", ["gn", "hessian"])
def test_forward_replaced_on_an_instance_takes_the_generic_path(kind):
    """A Linear whose forward is replaced on the instance (here a weight mask) is not the layer the
    fast paths write out (the true-Hessian path was 86% off): the generic path runs, exactly."""
    model = mlp((5, 7, 1))
    mask = (torch.rand(7, 5, generator=torch.Generator().manual_seed(3)) > 0.3).double()
    model[0].forward = lambda x, l=model[0]: nn.functional.linear(x, l.weight * mask, l.bias)
    x, y = data(N, 5, "mse")
    op = (fk.gn_hvp if kind == "gn" else fk.hessian_hvp)(model, "mse", x, y)
    assert op.path == "generic" and "forward" in op.path_reason
    dense = (dense_gn if kind == "gn" else dense_hessian)(model, "mse", x, y)
    V = _vectors(op.num_params, seed=7)
    assert rel(op(V), V @ dense) < 1e-12
