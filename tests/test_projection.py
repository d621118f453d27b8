"""project_model == project(per_sample_grads(...)) for models mixing covered and uncovered layers."""
import pytest
import torch
from torch import nn

import fimoda_kernels as fk


class SeqModel(nn.Module):
    """Sequence Linear (T > 1) then a pooled head; a free scale parameter stays uncovered."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(5, 6)
        self.scale = nn.Parameter(torch.tensor(1.3))
        self.head = nn.Linear(6, 3, bias=False)

    def forward(self, x):
        return self.head(torch.tanh(self.proj(x)).mean(1) * self.scale)


def _cnn():
    return nn.Sequential(nn.Conv2d(2, 4, 3, padding=1, stride=2), nn.ReLU(),
                         nn.Conv2d(4, 4, 3, groups=2), nn.ReLU(),  # grouped: uncovered
                         nn.Flatten(), nn.Linear(4 * 2 * 2, 3))


CASES = {
    "mlp": (lambda: nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.Tanh(), nn.Linear(16, 1)),
            lambda g: (torch.randn(21, 8, generator=g), torch.randn(21, generator=g)), "mse"),
    "seq": (SeqModel, lambda g: (torch.randn(9, 4, 5, generator=g), torch.randint(0, 3, (9,), generator=g)),
            "cross_entropy"),
    "cnn": (_cnn, lambda g: (torch.randn(7, 2, 8, 8, generator=g), torch.randint(0, 3, (7,), generator=g)),
            "cross_entropy"),
}


def float64_case(case, seed=1):
    """(model, task, inputs, targets) of CASES[case] in float64, eval mode."""
    make, data, task = CASES[case]
    torch.manual_seed(0)
    model = make().double().eval()
    x, y = data(torch.Generator().manual_seed(seed))
    return model, task, x.double(), (y.double() if task == "mse" else y)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("wrt", ["loss", "output"])
@pytest.mark.parametrize("kind", ["rademacher", "gaussian"])
def test_equals_projected_per_sample_grads(case, wrt, kind):
    model, task, x, y = float64_case(case)
    out = fk.project_model(model, task, x, y, 37, 11, wrt=wrt, kind=kind)
    want = fk.project(fk.per_sample_grads(model, task, x, y, wrt=wrt), 37, 11, kind)
    assert out.shape == (x.shape[0], 37) and out.dtype == torch.float64
    assert torch.allclose(out, want, rtol=1e-10, atol=1e-12)


def test_float32_model_and_chunking():
    make, data, task = CASES["cnn"]
    torch.manual_seed(0)
    model = make().eval()
    x, y = data(torch.Generator().manual_seed(2))
    whole = fk.project_model(model, task, x, y, 64, 3)
    chunked = fk.project_model(model, task, x, y, 64, 3, max_memory=2000)  # one sample at a time
    want = fk.project(fk.per_sample_grads(model.double(), task, x.double(), y), 64, 3).float()
    assert whole.dtype == torch.float32
    assert torch.allclose(whole, chunked, rtol=1e-5, atol=1e-6)
    assert float((whole - want).norm() / want.norm()) < 1e-5


def test_kronecker_model():
    model, task, x, y = float64_case("mlp", seed=3)
    out = fk.project_model(model, task, x, y, 64, 5, kind="kronecker")
    assert out.shape == (21, 64) and torch.isfinite(out).all()
    # layer by layer it is project_linear's Kronecker form; the LayerNorm goes through Rademacher
    cap = fk.capture_linear(model).run(task, x, y)
    want = sum(fk.project_linear(l.a[..., :-1], l.s, 64, 5, l.weight_offset, bias=True, kind="kronecker")
               for l in cap.layers)
    G = fk.per_sample_grads(model, task, x, y, param_names=[u.name for u in cap.uncovered])
    col = 0
    for u in cap.uncovered:
        want = want + fk.project(G[:, col:col + u.numel], 64, 5, "rademacher", u.offset)
        col += u.numel
    assert torch.allclose(out, want, rtol=1e-12, atol=1e-12)


def test_kronecker_layer_without_bias():
    """A bias-free layer's Kronecker projection has no bias block (a phantom one, projected from the
    output gradients, biased the projected inner products by ssᵀ)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4, bias=False), nn.Tanh(), nn.Linear(4, 1)).double().eval()
    x, y = torch.randn(6, 3, dtype=torch.float64), torch.randn(6, dtype=torch.float64)
    out = fk.project_model(model, "mse", x, y, 16, 2, kind="kronecker")
    cap = fk.capture_linear(model).run("mse", x, y)
    first, head = cap.layers
    want = (fk.project_linear(first.a, first.s, 16, 2, first.weight_offset, bias=False, kind="kronecker")
            + fk.project_linear(head.a[..., :-1], head.s, 16, 2, head.weight_offset, bias=True, kind="kronecker"))
    assert torch.allclose(out, want, rtol=1e-12, atol=1e-12)


def test_bad_input():
    model = nn.Linear(3, 1)
    x, y = torch.randn(4, 3), torch.randn(4)
    with pytest.raises(ValueError, match="kind: expected one of"):
        fk.project_model(model, "mse", x, y, 8, 0, kind="sparse")
    with pytest.raises(ValueError, match="targets: expected 4 samples"):
        fk.project_model(model, "mse", x, y[:3], 8, 0)
    with pytest.raises(ValueError, match="k: expected an integer >= 1"):
        fk.project_model(model, "mse", x, y, 0, 0)
    with pytest.raises(ValueError, match="max_memory: expected an integer >= 1"):
        fk.project_model(model, "mse", x, y, 8, 0, max_memory=0)
    sparse = nn.Sequential(nn.Embedding(5, 3, sparse=True), nn.Flatten(), nn.Linear(6, 1))
    tokens = torch.randint(0, 5, (4, 2))
    for fn in (lambda: fk.project_model(sparse, "mse", tokens, y, 8, 0), lambda: fk.per_sample_grads(sparse, "mse", tokens, y)):
        with pytest.raises(ValueError, match="model: 0 has sparse=True.*sparse=False"):
            fn()


def test_no_samples():
    """n = 0: a [0, k] result (it was None), and k and seed still checked."""
    model = nn.Linear(3, 1)
    x, y = torch.randn(0, 3), torch.randn(0)
    out = fk.project_model(model, "mse", x, y, 8, 0)
    assert out.shape == (0, 8) and out.dtype == torch.float32
    assert fk.project_model(model.double(), "mse", x.double(), y.double(), 8, 0).dtype == torch.float64
    with pytest.raises(ValueError, match="k: expected an integer >= 1"):
        fk.project_model(model, "mse", x.double(), y.double(), 0, 0)
    with pytest.raises(ValueError, match="seed: expected an integer >= 0"):
        fk.project_model(model, "mse", x.double(), y.double(), 8, -5)
