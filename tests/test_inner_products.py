"""grad_dot_model == grad_dot of torch.func per-sample gradients, with either form per layer."""
import pytest
import torch
from torch import nn

import fimoda_kernels as fk
import fimoda_kernels.inner_products as ip
from fimoda_kernels.grads import per_sample_grads
from helpers import randn, rel
from test_projection import CASES, float64_case


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("form", ["auto", "factored", "materialized"])
@pytest.mark.parametrize("normalize", [False, True])
def test_equals_dense_on_per_sample_grads(case, form, normalize, monkeypatch):
    if form != "auto":
        monkeypatch.setattr(ip, "_choose_form", lambda *a: form)
    model, task, x, y = float64_case(case)
    n = x.shape[0] - 3
    out, info = fk.grad_dot_model(model, task, (x[:n], y[:n]), (x[n:], y[n:]), normalize, return_info=True)
    G = fk.per_sample_grads(model, task, x, y)
    assert out.shape == (n, 3) and out.dtype == torch.float64
    assert torch.allclose(out, fk.grad_dot(G[:n], G[n:], normalize), rtol=1e-9, atol=1e-12)
    if form != "auto":
        assert set(info["layers"].values()) == {form}


def test_form_choice_follows_flops():
    """A wide MLP layer (T = 1) is factored; a conv with many positions and few weights is not."""
    mlp = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 1))
    x, y = torch.randn(10, 64), torch.randn(10)
    _, info = fk.grad_dot_model(mlp, "mse", (x, y), (x[:4], y[:4]), return_info=True)
    assert set(info["layers"].values()) == {"factored"}
    cnn = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.Flatten(), torch.nn.Linear(2 * 14 * 14, 1))
    x, y = torch.randn(6, 1, 16, 16), torch.randn(6)
    _, info = fk.grad_dot_model(cnn, "mse", (x, y), (x[:2], y[:2]), return_info=True)
    assert info["layers"]["0"] == "materialized"  # T = 196: T² (d_in + d_out) ≫ d_out·d_in = 18


def test_chunking_same_result():
    make, data, task = CASES["cnn"]
    torch.manual_seed(0)
    model = make().eval()
    x, y = data(torch.Generator().manual_seed(2))
    whole = fk.grad_dot_model(model, task, (x, y), (x[:3], y[:3]), True)
    chunked = fk.grad_dot_model(model, task, (x, y), (x[:3], y[:3]), True, max_memory=1500)
    assert torch.allclose(whole, chunked, rtol=1e-5, atol=1e-6)


def test_bad_input():
    model = torch.nn.Linear(3, 1)
    x, y = torch.randn(4, 3), torch.randn(4)
    with pytest.raises(TypeError, match="train: expected an \\(inputs, targets\\) pair"):
        fk.grad_dot_model(model, "mse", x, (x, y))
    with pytest.raises(ValueError, match="targets: expected 4 samples"):
        fk.grad_dot_model(model, "mse", (x, y), (x, y[:2]))
    with pytest.raises(TypeError, match="normalize: expected a bool"):
        fk.grad_dot_model(model, "mse", (x, y), (x, y), normalize="yes")


@pytest.mark.parametrize("wrt", ["loss", "output"])
def test_grad_dot_vectors_matches_materialized(wrt):
    # Conv2d (T > 1), a LayerNorm (uncovered: materialized) and Linear layers
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.Flatten(), nn.LayerNorm(12), nn.Tanh(), nn.Linear(12, 3)).double()
    x = randn(9, 2, 4, 4, dtype=torch.float64, seed=1)
    y = torch.randint(0, 3, (9,), generator=torch.Generator().manual_seed(2))
    p = sum(q.numel() for q in model.parameters())
    V = randn(5, p, dtype=torch.float64, seed=3)
    ref = per_sample_grads(model, "cross_entropy", x, y, wrt) @ V.T
    out = fk.grad_dot_vectors(model, "cross_entropy", x, y, V, wrt, max_memory=4096)  # several chunks
    assert rel(out, ref) < 1e-12


def test_grad_dot_vectors_rejects_bad_vectors():
    model = nn.Linear(3, 1).double()
    x, y = randn(4, 3, dtype=torch.float64), randn(4, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"vectors: expected a \[r, 4\] tensor"):
        fk.grad_dot_vectors(model, "mse", x, y, randn(2, 5, dtype=torch.float64))
    with pytest.raises(ValueError, match="vectors: expected a 2-D tensor"):
        fk.grad_dot_vectors(model, "mse", x, y, randn(4, dtype=torch.float64))
    with pytest.raises(ValueError, match="vectors: expected finite values"):
        fk.grad_dot_vectors(model, "mse", x, y, torch.full((1, 4), float("nan"), dtype=torch.float64))
    with pytest.raises(TypeError, match="vectors: expected dtype"):
        fk.grad_dot_vectors(model, "mse", x, y, torch.ones(1, 4, dtype=torch.int64))


def test_empty_sets_give_empty_results():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).double()
    x, y = randn(5, 3, dtype=torch.float64, seed=1), randn(5, dtype=torch.float64, seed=2)
    for normalize in (False, True):
        out = fk.grad_dot_model(model, "mse", (x[:0], y[:0]), (x, y), normalize=normalize)
        assert out.shape == (0, 5) and out.dtype == torch.float64
    assert fk.grad_dot_model(model, "mse", (x, y), (x[:0], y[:0])).shape == (5, 0)
    V = randn(2, 21, dtype=torch.float64, seed=3)
    assert fk.grad_dot_vectors(model, "mse", x[:0], y[:0], V).shape == (0, 2)


@pytest.mark.parametrize("scale", [1e-30, 1e-21, 1e15])
def test_grad_cos_float32_tiny_or_huge_gradients(scale):
    """float32 Grad-Cos of a model whose gradients are tiny or huge (a last layer scaled, an uncovered
    parameter beside the captured layers): the cosines match float64's (their squares had underflowed,
    giving 0 or 0.6% errors, or overflowed). Gradients that overflow float32 themselves are refused,
    naming the sample."""

    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 1))
            self.gain = nn.Parameter(torch.ones(1))  # not a layer: materialized

        def forward(self, x):
            return self.body(x) * self.gain

    torch.manual_seed(0)
    model = Scaled()
    with torch.no_grad():
        model.body[2].weight.mul_(scale), model.body[2].bias.mul_(scale)
    x, y = torch.randn(9, 4), torch.zeros(9, 1)
    got = fk.grad_dot_model(model, "mse", (x[:6], y[:6]), (x[6:], y[6:]), normalize=True, max_memory=600)
    G = per_sample_grads(model.double(), "mse", x.double(), y.double())
    assert rel(got, fk.grad_dot(G[:6], G[6:], normalize=True)) < 1e-5
    with torch.no_grad():
        model.float().body[2].weight.fill_(1e25)
    with pytest.raises(ValueError, match="finite per-sample gradients, got NaN or Inf for sample 0"):
        fk.grad_dot_model(model, "mse", (x[:6], y[:6]), (x[6:], y[6:]), normalize=True)


def test_non_finite_sample_named_in_the_callers_numbering():
    """A sample whose gradient overflows is named by its index in the whole set, not in its chunk."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 1))
    x, y = torch.randn(12, 3), torch.randn(12, 1)
    y[9] = 3e38  # float32: its loss gradient 2(f − y) overflows
    for call in (lambda: fk.grad_dot_model(model, "mse", (x, y), (x[:2], y[:2]), max_memory=200),
                 lambda: fk.project_model(model, "mse", x, y, 8, 0, max_memory=200)):
        with pytest.raises(ValueError, match="got NaN or Inf for sample 9 "):
            call()
