"""Per-sample gradients and Linear/Conv2d capture (MATH.md §4) against explicit autograd loops."""
import pytest
import torch
import torch.nn.functional as F
from helpers import Reordering
from hypothesis import given, settings, strategies as st
from torch import nn

from fimoda_kernels.grads import capture_linear, iter_per_sample_grads, param_layout, per_sample_grads
from fimoda_kernels.tasks import CrossEntropyTask, MSETask

D = torch.float64
TOL = dict(rtol=1e-10, atol=1e-10)


def loop_grads(model, task, x, y, wrt="loss"):
    """The oracle: one autograd call per sample, flattened in named_parameters order."""
    params = [p for p in model.parameters() if p.requires_grad]
    rows = []
    for i in range(x.shape[0]):
        out = model(x[i:i + 1])
        val = task.loss(out, y[i:i + 1]) if wrt == "loss" else task.output(out, y[i:i + 1])
        rows.append(torch.cat([g.flatten() for g in torch.autograd.grad(val.sum(), params)]))
    return torch.stack(rows)


def mlp(d_in=8, hidden=(13, 7), d_out=1, bias=True):
    dims, layers = (d_in, *hidden), []
    for i, (a, b) in enumerate(zip(dims, dims[1:])):
        layers += [nn.Linear(a, b, bias=bias), nn.ReLU() if i % 2 == 0 else nn.Tanh()]
    return nn.Sequential(*layers, nn.Linear(dims[-1], d_out, bias=bias)).to(D)


class ScaledNorm(nn.Module):
    """Parameters outside Linear layers: a LayerNorm and a standalone scale."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(6, 9)
        self.norm = nn.LayerNorm(9)
        self.scale = nn.Parameter(torch.tensor([1.5]))
        self.fc2 = nn.Linear(9, 3)

    def forward(self, x):
        return self.fc2(torch.tanh(self.norm(self.fc1(x))) * self.scale)


class SeqModel(nn.Module):
    """Linear layers applied over a sequence [n, T, d]; the head sees the mean over T."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(5, 7)
        self.mix = nn.Linear(7, 4, bias=False)
        self.head = nn.Linear(4, 1)

    def forward(self, x):
        return self.head(torch.tanh(self.mix(torch.relu(self.proj(x)))).flatten(1, -2).mean(1))


class ConvNet(nn.Module):
    def __init__(self, bias=True):
        super().__init__()
        self.conv1 = nn.Conv2d(2, 3, 3, stride=2, padding=1, bias=bias)
        self.conv2 = nn.Conv2d(3, 4, (2, 3), padding=(1, 0), dilation=(1, 2), bias=bias)
        self.conv3 = nn.Conv2d(4, 2, (2, 3), padding="same", bias=bias)  # asymmetric 'same' padding
        self.fc = nn.Linear(2, 3, bias=bias)

    def forward(self, x):
        h = torch.tanh(self.conv3(torch.relu(self.conv2(torch.tanh(self.conv1(x))))))
        return self.fc(h.mean((2, 3)))


def _ce_data(n, d, classes):
    return torch.randn(n, d, dtype=D), torch.randint(0, classes, (n,))


# ----------------------------------------------------------------------------- per_sample_grads

@pytest.mark.parametrize("wrt", ["loss", "output"])
def test_mlp_regression_matches_loop(wrt):
    model, task = mlp(), MSETask()
    x, y = torch.randn(9, 8, dtype=D), torch.randn(9, dtype=D)
    G = per_sample_grads(model, task, x, y, wrt=wrt)
    assert G.dtype == D and G.shape == (9, sum(p.numel() for p in model.parameters()))
    torch.testing.assert_close(G, loop_grads(model, task, x, y, wrt), **TOL)


@pytest.mark.parametrize("wrt", ["loss", "output"])
def test_classifier_matches_loop(wrt):
    model = mlp(8, (16,), 10)
    x, y = _ce_data(7, 8, 10)
    G = per_sample_grads(model, "cross_entropy", x, y, wrt=wrt)
    torch.testing.assert_close(G, loop_grads(model, CrossEntropyTask(), x, y, wrt), **TOL)


def test_non_linear_parameters_and_frozen_and_buffers():
    model = ScaledNorm().to(D)
    model.fc1.bias.requires_grad_(False)  # frozen: absent from the columns
    x, y = _ce_data(6, 6, 3)
    G = per_sample_grads(model, "classification_ce", x, y)
    assert [s.name for s in param_layout(model)] == [  # a module's own parameters come first
        "scale", "fc1.weight", "norm.weight", "norm.bias", "fc2.weight", "fc2.bias"]
    torch.testing.assert_close(G, loop_grads(model, CrossEntropyTask(), x, y), **TOL)

    bn = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Tanh(), nn.Linear(5, 1)).to(D)
    bn[1].running_mean.normal_(), bn[1].running_var.uniform_(0.5, 2)
    bn.eval()
    x, y = torch.randn(5, 4, dtype=D), torch.randn(5, dtype=D)
    torch.testing.assert_close(per_sample_grads(bn, "mse", x, y), loop_grads(bn, MSETask(), x, y), **TOL)


def test_non_finite_gradients_raise():
    model = mlp()
    x, y = torch.randn(5, 8, dtype=D), torch.randn(5, dtype=D)
    x[3, 2] = float("nan")
    with pytest.raises(ValueError, match="inputs: expected finite values, got NaN or Inf at sample 3"):
        per_sample_grads(model, "mse", x, y)
    x[3, 2], y[3] = 0.5, 1e308  # finite data, a loss gradient 2(f − y) that overflows
    with pytest.raises(ValueError, match="finite per-sample gradients, got NaN or Inf for sample 3"):
        per_sample_grads(model, "mse", x, y)


def test_zero_dim_parameter():
    """A 0-D parameter (a scalar scale) is one column, like any other."""
    model = ScaledNorm().to(D)
    model.scale = nn.Parameter(torch.tensor(1.5, dtype=D))
    x, y = _ce_data(4, 6, 3)
    G = per_sample_grads(model, "classification_ce", x, y)
    torch.testing.assert_close(G, loop_grads(model, CrossEntropyTask(), x, y), **TOL)


def test_param_layout_offsets():
    model = ScaledNorm()
    layout = param_layout(model)
    offset = 0
    for (name, p), slot in zip(model.named_parameters(), layout):
        assert slot == (name, offset, p.numel(), p.shape)
        offset += p.numel()


def test_chunking_gives_identical_results():
    model, task = mlp(), MSETask()
    x, y = torch.randn(10, 8, dtype=D), torch.randn(10, dtype=D)
    full = per_sample_grads(model, task, x, y)
    p = full.shape[1]
    for max_memory, chunk in [(1, 1), (3 * 8 * p * 3, 3), (3 * 8 * p * 4 + 7, 4)]:
        starts = [s for s, _ in iter_per_sample_grads(model, task, x, y, max_memory=max_memory)]
        assert starts == list(range(0, 10, chunk))
        torch.testing.assert_close(per_sample_grads(model, task, x, y, max_memory=max_memory), full,
                                   rtol=1e-14, atol=1e-15)


def test_param_names_subset():
    model = ScaledNorm().to(D)
    x, y = _ce_data(4, 6, 3)
    full = per_sample_grads(model, "cross_entropy", x, y)
    slots = {s.name: s for s in param_layout(model)}
    names = ["fc2.bias", "norm.weight"]  # columns follow named_parameters order, not this order
    sub = per_sample_grads(model, "cross_entropy", x, y, param_names=names)
    expect = torch.cat([full[:, slots[n].offset:slots[n].offset + slots[n].numel]
                        for n in ("norm.weight", "fc2.bias")], 1)
    torch.testing.assert_close(sub, expect, **TOL)


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(targets=torch.randn(4)), ValueError, r"targets.*5 samples.*\(4,\)"),
    (dict(wrt="params"), ValueError, "wrt.*'params'"),
    (dict(max_memory=1.5), TypeError, "max_memory.*float"),
    (dict(max_memory=0), ValueError, "max_memory.*>= 1.*0"),
    (dict(max_memory=-3), ValueError, "max_memory"),
    (dict(model=lambda x: x), TypeError, "model.*Module"),
    (dict(task="hinge"), ValueError, "task"),
    (dict(inputs=[[0.0]] * 5), TypeError, "inputs.*list"),
    (dict(param_names=["nope"]), ValueError, "param_names.*nope"),
    (dict(targets=torch.randn(5, 3)), ValueError, "targets"),  # MSE shape check inside the task
])
def test_bad_inputs_name_the_argument(kwargs, exc, match):
    args = dict(model=mlp(3, (4,)), task="mse", inputs=torch.randn(5, 3, dtype=D),
                targets=torch.randn(5, dtype=D))
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        per_sample_grads(**args)


def test_no_trainable_parameters_rejected():
    model = mlp(3, (4,)).requires_grad_(False)
    with pytest.raises(ValueError, match="model.*requires_grad"):
        per_sample_grads(model, "mse", torch.randn(2, 3, dtype=D), torch.randn(2, dtype=D))


# ----------------------------------------------------------------------------- capture

def check_capture(model, task, x, y, wrt="loss", n_layers=None):
    """Every captured layer's Σ_t s aᵀ equals its block of per_sample_grads; returns the capture."""
    G = per_sample_grads(model, task, x, y, wrt=wrt)
    slots = {s.name: s for s in param_layout(model)}
    grads_before = [p.grad for p in model.parameters()]
    cap = capture_linear(model).run(task, x, y, wrt=wrt)
    assert [p.grad for p in model.parameters()] == grads_before  # run() leaves .grad alone
    if n_layers is not None:
        assert len(cap.layers) == n_layers
    for layer in cap.layers:
        prefix = f"{layer.name}." if layer.name else ""
        w = slots[prefix + "weight"]
        assert layer.weight_offset == w.offset and layer.d_out * layer.d_in == w.numel
        assert layer.has_bias == (layer.bias_offset is not None)
        if layer.has_bias:
            assert layer.bias_offset == slots[prefix + "bias"].offset == w.offset + w.numel
        assert layer.a.shape[:-1] == layer.s.shape[:-1]
        assert layer.a.shape[-1] == layer.d_in + layer.has_bias and layer.s.shape[-1] == layer.d_out
        a, s = (t if t.dim() == 3 else t.unsqueeze(1) for t in (layer.a, layer.s))
        assert a.shape[1] == layer.T
        mat = torch.einsum("nto,nti->noi", s, a)  # Σ_t s_t a_tᵀ, bias as last column
        block = G[:, layer.weight_offset:layer.weight_offset + layer.numel]
        torch.testing.assert_close(layer.grad_matrix_to_flat(mat), block, **TOL)
        torch.testing.assert_close(layer.per_sample_grads(), block, **TOL)
        torch.testing.assert_close(layer.flat_to_grad_matrix(block), mat, **TOL)
        torch.testing.assert_close(mat[..., :layer.d_in].flatten(1),
                                   G[:, w.offset:w.offset + w.numel], **TOL)
    return cap


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("wrt", ["loss", "output"])
def test_capture_mlp(bias, wrt):
    model = mlp(bias=bias)
    x, y = torch.randn(6, 8, dtype=D), torch.randn(6, dtype=D)
    cap = check_capture(model, MSETask(), x, y, wrt, n_layers=3)
    assert [l.name for l in cap.layers] == ["0", "2", "4"] and all(l.T == 1 for l in cap.layers)
    assert cap.layers[0].a.shape == (6, 8 + bias) and cap.uncovered == []


def test_capture_sequence_linear():
    model = SeqModel().to(D)
    x, y = torch.randn(5, 4, 5, dtype=D), torch.randn(5, dtype=D)
    cap = check_capture(model, "mse", x, y, n_layers=3)
    proj, mix, head = cap.layers
    assert proj.a.shape == (5, 4, 6) and proj.s.shape == (5, 4, 7) and proj.T == 4
    assert not mix.has_bias and mix.a.shape == (5, 4, 7)
    assert head.a.shape == (5, 5) and head.T == 1
    x4 = torch.randn(3, 2, 3, 5, dtype=D)  # several middle dims are flattened into T
    cap = check_capture(model, "mse", x4, torch.randn(3, dtype=D), n_layers=3)
    assert cap.layers[0].T == 6


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
@pytest.mark.parametrize("bias", [True, False])
def test_capture_conv2d(bias):
    model = ConvNet(bias).to(D)
    x, y = _ce_data(4, 2 * 9 * 12, 3)
    x = x.reshape(4, 2, 9, 12)
    cap = check_capture(model, "cross_entropy", x, y, n_layers=4)
    c1 = cap.layers[0]
    assert c1.d_in == 2 * 9 and c1.T == 5 * 6 and c1.a.shape == (4, 30, 18 + bias)
    assert c1.s.shape == (4, 30, 3) and cap.layers[2].T == 6 * 2


class TimeMajor(nn.Module):
    """Takes [n, T, d] but runs its first Linear time-major ([T, n, d]): the samples lie along dim 1."""

    def __init__(self):
        super().__init__()
        self.fc, self.head = nn.Linear(5, 6), nn.Linear(6, 1)

    def forward(self, x):
        return self.head(torch.tanh(self.fc(x.transpose(0, 1))).mean(0)).squeeze(-1)


def test_capture_samples_off_dim_0():
    """A layer whose input carries the samples along dim 1 is left to the generic path even when the
    time dimension has the size of the batch (dim 0 then has n rows too: its (a, s) would mix the
    samples); batch-first layers with T = n, and convolutions with n channels, stay captured."""
    import fimoda_kernels as fk

    torch.manual_seed(0)
    model, x, y = TimeMajor().to(D), torch.randn(6, 6, 5, dtype=D), torch.randn(6, dtype=D)
    cap = check_capture(model, "mse", x, y, n_layers=1)
    assert [l.name for l in cap.layers] == ["head"]
    assert {u.name for u in cap.uncovered} == {"fc.weight", "fc.bias"}
    assert "not along dim 0" in cap.uncovered[0].reason
    G = per_sample_grads(model, "mse", x, y)
    torch.testing.assert_close(fk.grad_dot_model(model, "mse", (x, y), (x, y)), G @ G.T, **TOL)
    assert [l.name for l in check_capture(model, "mse", x[:4], y[:4]).layers] == ["head"]  # T ≠ n: dim 0 ≠ n
    seq = SeqModel().to(D)
    assert len(check_capture(seq, "mse", torch.randn(4, 4, 5, dtype=D), torch.randn(4, dtype=D)).layers) == 3
    conv = nn.Sequential(nn.Conv2d(3, 3, 2), nn.Flatten(), nn.Linear(12, 1)).to(D)
    assert len(check_capture(conv, "mse", torch.randn(3, 3, 3, 3, dtype=D), torch.randn(3, 1, dtype=D)).layers) == 2


class PositionTable(nn.Module):
    """A Linear applied to a learned [T, d] table (not to the samples), broadcast onto the batch:
    with T = n its input has n rows along dim 0 by chance."""

    def __init__(self, T=6):
        super().__init__()
        self.pos = nn.Parameter(torch.randn(T, 3))
        self.pos_proj, self.fc, self.head = nn.Linear(3, 4), nn.Linear(5, 4), nn.Linear(4, 1)

    def forward(self, x):  # x [n, T, 5]
        return self.head(torch.tanh(self.fc(x) + self.pos_proj(self.pos))).mean(1).squeeze(-1)


def _probe_cases():
    """(model, x, y, names of the layers that must stay captured) for the one-sample probe."""
    torch.manual_seed(1)
    x6 = torch.randn(6, 6, 5, dtype=D)
    hooked = mlp().to(D)
    hooked[0].register_forward_hook(lambda m, args, out: out * 2.0)  # replaces the layer output
    gain = mlp().to(D)
    gain[0].gain = nn.Parameter(torch.rand(13, dtype=D) + 0.5)  # an extra parameter on a stock Linear
    gain.forward = lambda x, m=gain: m[1:](m[0](x) * m[0].gain).squeeze(-1)
    xr = torch.randn(7, 4, dtype=D)
    xr[0, 0] = 10.0  # sorted last
    masked = mlp().to(D)
    mask = (torch.rand(13, 8) > 0.3).to(D)
    masked[0].forward = lambda x, l=masked[0]: F.linear(x, l.weight * mask, l.bias)  # replaced on the instance
    return {
        "position table, T = n": (PositionTable().to(D), x6, torch.randn(6, dtype=D), ["fc", "head"]),
        "time-major, T = 1, n = 1": (TimeMajor().to(D), torch.randn(1, 1, 5, dtype=D), torch.randn(1, dtype=D),
                                     ["head"]),
        # the probe compares sample 0's rows: it must move when sorted (a reordering that keeps it in
        # place goes unnoticed, and in a set of one sample there is nothing to notice)
        "reordered batch": (Reordering(4).to(D), xr, torch.randn(7, dtype=D), ["head"]),
        "user forward hook": (hooked, torch.randn(5, 8, dtype=D), torch.randn(5, dtype=D), ["0", "2", "4"]),
        "extra parameter on a Linear": (gain, torch.randn(5, 8, dtype=D), torch.randn(5, dtype=D), ["0", "2", "4"]),
        "forward replaced on the instance": (masked, torch.randn(5, 8, dtype=D), torch.randn(5, dtype=D), ["2", "4"]),
    }


@pytest.mark.parametrize("case", list(_probe_cases()))
def test_capture_takes_only_layers_whose_rows_are_the_samples(case):
    """Each of these models made the capture mix samples or drop a term (grad_dot_model 12-70% off)
    before: now exactly the layers whose (a, s) are the per-sample ones are captured, the rest go
    to the generic path, and the inner products are exact, also for chunks of other sizes."""
    import fimoda_kernels as fk

    model, x, y, kept = _probe_cases()[case]
    cap = check_capture(model, "mse", x, y)
    assert [l.name for l in cap.layers] == kept
    G = per_sample_grads(model, "mse", x, y)
    torch.testing.assert_close(fk.grad_dot_model(model, "mse", (x, y), (x[:2], y[:2])), G @ G[:2].T, **TOL)
    torch.testing.assert_close(fk.project_model(model, "mse", x, y, k=16, seed=3),
                               fk.project(G, 16, 3).double(), **TOL)


def test_capture_refuses_layers_under_global_forward_hooks():
    model, x, y = mlp().to(D), torch.randn(4, 8, dtype=D), torch.randn(4, dtype=D)
    handle = nn.modules.module.register_module_forward_hook(lambda m, args, out: None)
    try:
        cap = check_capture(model, "mse", x, y, n_layers=0)
    finally:
        handle.remove()
    assert "global module forward hooks" in cap.uncovered[0].reason


class _Squeeze(nn.Module):
    def forward(self, x):
        return x.squeeze()


class _ClampsInput(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 1)

    def forward(self, x):
        return self.fc(x.clamp_(-1, 1)).squeeze(-1)  # writes its input


def test_capture_probe_runs_models_that_one_sample_would_break():
    """The probe forward runs two samples (a .squeeze() collapses one: the capture raised) as a copy
    (a model writing its input in place failed on the expanded copies of a one-sample batch)."""
    import fimoda_kernels as fk

    torch.manual_seed(0)
    conv = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), _Squeeze(), nn.Linear(4, 3)).to(D)
    x, y = torch.randn(6, 3, 5, 5, dtype=D), torch.randint(0, 3, (6,))
    assert len(capture_linear(conv).run("cross_entropy", x, y).layers) == 2
    rows = []  # the oracle runs each sample twice (per_sample_grads' batch of one is squeezed too)
    for i in range(6):
        loss = F.cross_entropy(conv(x[[i, i]])[:1], y[i:i + 1])
        rows.append(torch.cat([g.flatten() for g in torch.autograd.grad(loss, list(conv.parameters()))]))
    G = torch.stack(rows)
    torch.testing.assert_close(fk.attribute("grad_dot", conv, "cross_entropy", (x, y), (x[:2], y[:2])), G @ G[:2].T,
                               **TOL)
    model, x1 = _ClampsInput().to(D), torch.randn(1, 3, dtype=D) * 3
    cap = capture_linear(model).run("mse", x1.clone(), torch.randn(1, dtype=D))
    assert [l.name for l in cap.layers] == ["fc"]


def test_capture_leaves_layers_to_the_generic_path_when_the_probe_fails():
    class FixedBatch(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 1)

        def forward(self, x):
            return self.fc(x.view(4, 3)).squeeze(-1)

    cap = capture_linear(FixedBatch().to(D)).run("mse", torch.randn(4, 3, dtype=D), torch.randn(4, dtype=D))
    assert cap.layers == [] and "a forward of 2 samples" in cap.uncovered[0].reason


class InPlaceResidual(nn.Module):
    """A Linear output changed in place (``h += x``) before the rest of the model reads it."""

    def __init__(self):
        super().__init__()
        self.a, self.o = nn.Linear(4, 4), nn.Linear(4, 3)

    def forward(self, x):
        h = self.a(x)
        h += x
        return self.o(torch.tanh(h))


@pytest.mark.parametrize("kind", ["relu", "silu", "leaky", "residual", "conv"])
def test_capture_with_in_place_ops_after_layers(kind):
    """ReLU(inplace=True) and friends rewrite a layer's output: the capture still records that layer's
    s (a gradient asked of the rewritten tensor would stop above the layer and leave s = 0), and so do
    the entry points built on it."""
    import fimoda_kernels as fk

    torch.manual_seed(0)
    act = {"relu": lambda: nn.ReLU(inplace=True), "silu": lambda: nn.SiLU(inplace=True),
           "leaky": lambda: nn.LeakyReLU(0.1, inplace=True)}
    if kind == "residual":
        model, x = InPlaceResidual().to(D), torch.randn(7, 4, dtype=D)
    elif kind == "conv":
        model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.ReLU(inplace=True), nn.Flatten(), nn.Linear(48, 3)).to(D)
        x = torch.randn(7, 2, 6, 6, dtype=D)
    else:
        model, x = nn.Sequential(nn.Linear(4, 6), act[kind](), nn.Linear(6, 3)).to(D), torch.randn(7, 4, dtype=D)
    y = torch.randint(0, 3, (7,), generator=torch.Generator().manual_seed(1))
    cap = check_capture(model, "cross_entropy", x, y, n_layers=2)
    assert all(bool(l.s.abs().sum() > 0) for l in cap.layers)
    G = per_sample_grads(model, "cross_entropy", x, y)
    torch.testing.assert_close(fk.grad_dot_model(model, "cross_entropy", (x[:4], y[:4]), (x[4:], y[4:])),
                               G[:4] @ G[4:].T, **TOL)
    V = torch.randn(2, G.shape[1], dtype=D)
    torch.testing.assert_close(fk.grad_dot_vectors(model, "cross_entropy", x, y, V), G @ V.T, **TOL)


def test_capture_under_no_grad_and_refusals():
    """An outer no_grad() does not change the results; inference_mode and a model whose Dropout or
    BatchNorm is in training mode are refused with the reason."""
    import fimoda_kernels as fk

    model = mlp()
    x, y = torch.randn(6, 8, dtype=D), torch.randn(6, dtype=D)
    want = fk.grad_dot_model(model, "mse", (x[:4], y[:4]), (x[4:], y[4:]))
    V = torch.randn(2, sum(p.numel() for p in model.parameters()), dtype=D)
    hvp = fk.gn_hvp(model, "mse", x, y)
    with torch.no_grad():
        torch.testing.assert_close(fk.grad_dot_model(model, "mse", (x[:4], y[:4]), (x[4:], y[4:])), want, **TOL)
        op = fk.gn_hvp(model, "mse", x, y)
        assert op.path == "linear"
        torch.testing.assert_close(op(V), hvp(V), **TOL)
    with torch.inference_mode(), pytest.raises(RuntimeError, match="inference_mode"):
        capture_linear(model).run("mse", x, y)
    for extra in (nn.Dropout(0.2), nn.BatchNorm1d(8)):
        m = nn.Sequential(extra, *mlp()).to(D).train()
        with pytest.raises(ValueError, match=r"model: 0 is in training mode.*model.eval\(\)"):
            per_sample_grads(m, "mse", x, y)
    with pytest.raises(TypeError, match=r"inputs: expected dtype torch.float64 \(the model's parameters\)"):
        per_sample_grads(model, "mse", x.float(), y)


def test_capture_conv_model_that_needs_nchw():
    """run() feeds CPU conv nets channels_last; a model whose .view rejects that layout runs on the
    input as given, with the same captured gradients."""
    class ViewNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.fc = nn.Conv2d(2, 3, 3, padding=1), nn.Linear(3 * 5 * 4, 3)

        def forward(self, x):
            h = torch.relu(self.conv(x))
            return self.fc(h.view(h.shape[0], -1))  # .view needs NCHW-contiguous memory

    model = ViewNet().to(D)
    x, y = _ce_data(4, 2 * 5 * 4, 3)
    x = x.reshape(4, 2, 5, 4)
    with pytest.raises(RuntimeError):
        model(x.contiguous(memory_format=torch.channels_last))
    check_capture(model, "cross_entropy", x, y, n_layers=2)


def test_capture_context_manager_matches_run():
    model, task = mlp(), MSETask()
    x, y = torch.randn(5, 8, dtype=D), torch.randn(5, dtype=D)
    ref = capture_linear(model).run(task, x, y)
    with capture_linear(model) as cap:
        task.loss(model(x), y).sum().backward()
    for a, b in zip(cap.layers, ref.layers):
        torch.testing.assert_close(a.per_sample_grads(), b.per_sample_grads(), rtol=0, atol=0)
    assert all(p.grad is not None for p in model.parameters())


def test_uncovered_lists_exactly_the_rest():
    class Mixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(5, 4)
            self.fc = nn.Linear(4, 6)
            self.gconv = nn.Conv2d(2, 2, 1, groups=2)
            self.twice = nn.Linear(6, 6)
            self.unused = nn.Linear(6, 6)
            self.frozen = nn.Linear(6, 6)
            self.frozen.weight.requires_grad_(False)
            self.scale = nn.Parameter(torch.ones(1))
            self.tied_a = nn.Linear(6, 3)
            self.tied_b = nn.Linear(6, 3)
            self.tied_b.weight = self.tied_a.weight
            self.head = nn.Linear(3, 1)

        def forward(self, idx):
            h = self.fc(self.emb(idx))
            h = h + self.gconv(h.reshape(-1, 2, 3, 1)).reshape(h.shape)
            h = self.frozen(torch.tanh(self.twice(torch.tanh(self.twice(h)))))
            return self.head(self.tied_a(h) * self.tied_b(h) * self.scale)

    model = Mixed().to(D)
    x, y = torch.randint(0, 5, (4,)), torch.randn(4, dtype=D)
    cap = check_capture(model, "mse", x, y)
    assert [l.name for l in cap.layers] == ["fc", "head"]
    slots = {s.name: s for s in param_layout(model)}
    captured = {f"{l.name}.{k}" for l in cap.layers for k in ("weight", "bias")}
    unc = {u.name: u for u in cap.uncovered}
    assert set(unc) == set(slots) - captured
    assert all((u.offset, u.numel) == slots[u.name][1:3] for u in unc.values())
    assert [u.name for u in cap.uncovered] == [s for s in slots if s in unc]  # layout order
    for name, why in [("emb.weight", "not a weight or bias"), ("gconv.weight", "grouped"),
                      ("twice.bias", "called 2 times"), ("unused.weight", "not called"),
                      ("frozen.bias", "weight does not require grad"), ("scale", "not a weight or bias"),
                      ("tied_a.weight", "shared"), ("tied_b.bias", "shared")]:
        assert why in unc[name].reason, (name, unc[name].reason)


def test_unreached_layer_gets_zero_s():
    class TwoHeads(nn.Module):
        def __init__(self):
            super().__init__()
            self.body, self.used, self.aux = nn.Linear(3, 4), nn.Linear(4, 1), nn.Linear(4, 2)

        def forward(self, x):
            h = torch.tanh(self.body(x))
            self.aux_out = self.aux(h)  # computed but not part of the loss
            return self.used(h)

    model = TwoHeads().to(D)
    cap = check_capture(model, "mse", torch.randn(3, 3, dtype=D), torch.randn(3, dtype=D), n_layers=3)
    assert torch.count_nonzero(cap.layers[2].s) == 0


def _hook_count(model):
    return sum(len(m._forward_hooks) for m in model.modules())


def test_hooks_removed_on_exit_and_on_exception():
    model = mlp()
    x, y = torch.randn(3, 8, dtype=D), torch.randn(3, dtype=D)
    cap = capture_linear(model)
    with cap:
        assert _hook_count(model) == 3
        out = model(x)
    assert _hook_count(model) == 0
    out.sum().backward()  # tensor hooks are gone too: s stays unrecorded
    assert all(l.s is None for l in cap.layers)
    with pytest.raises(RuntimeError, match="no inputs/output gradients"):
        cap.layers[0].per_sample_grads()
    with pytest.raises(ZeroDivisionError):
        with capture_linear(model):
            1 / 0
    assert _hook_count(model) == 0
    with pytest.raises(ValueError, match="targets"):
        capture_linear(model).run("mse", x, torch.randn(4, dtype=D))
    with pytest.raises(ValueError, match="model_out.*C >= 2"):  # fails inside run's capture
        capture_linear(model).run("cross_entropy", x, torch.zeros(3, dtype=torch.long))
    assert _hook_count(model) == 0


@settings(max_examples=20, deadline=None, database=None)
@given(n=st.integers(1, 5), d_in=st.integers(1, 6),
       hidden=st.lists(st.integers(1, 6), min_size=1, max_size=2), d_out=st.integers(1, 4),
       bias=st.booleans(), classify=st.booleans(), seed=st.integers(0, 2**16))
def test_capture_mlp_random_shapes(n, d_in, hidden, d_out, bias, classify, seed):
    torch.manual_seed(seed)
    d_out = max(d_out, 2) if classify else 1
    model = mlp(d_in, tuple(hidden), d_out, bias)
    x = torch.randn(n, d_in, dtype=D)
    y = torch.randint(0, d_out, (n,)) if classify else torch.randn(n, dtype=D)
    cap = check_capture(model, "cross_entropy" if classify else "mse", x, y, n_layers=len(hidden) + 1)
    assert cap.uncovered == []


def test_capture_refuses_an_inf_activation_behind_a_saturating_output():
    """An activation that overflowed to inf before a tanh leaves the loss finite and the output
    gradients finite (tanh' = 0), but the layer's per-sample gradient s·aᵀ NaN: the capture names the
    sample and the layer."""
    from fimoda_kernels.grads import SampleError

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1), nn.Tanh()).eval()
    with torch.no_grad():
        model[0].weight[0] = 1e30  # hidden unit 0 overflows float32 for large inputs
    x, y = torch.tensor([[0.1, 0.2], [1e10, 1e10], [0.3, -0.1]]), torch.zeros(3, 1)
    with pytest.raises(SampleError, match=r"for sample 1 \(the input of layer '2'"):
        capture_linear(model).run("mse", x, y)


class Recurrent(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn, self.head = nn.GRU(3, 4, batch_first=True), nn.Linear(4, 1)

    def forward(self, x):
        return self.head(self.rnn(x)[0][:, -1]).squeeze(-1)


def test_models_vmap_cannot_batch_fall_back_to_one_sample_at_a_time():
    """torch.func.vmap has no batching rule for nn.GRU/LSTM/RNN (it raised a shape error from torch):
    the gradients are computed sample by sample instead, with a warning, and are exact."""
    import fimoda_kernels as fk
    from fimoda_kernels import FallbackWarning

    torch.manual_seed(0)
    model, x, y = Recurrent().to(D).eval(), torch.randn(5, 4, 3, dtype=D), torch.randn(5, dtype=D)
    with pytest.warns(FallbackWarning, match="vmap cannot run this model"):
        G = per_sample_grads(model, "mse", x, y, max_memory=1)  # chunks of one sample
    torch.testing.assert_close(G, loop_grads(model, MSETask(), x, y), **TOL)
    with pytest.warns(FallbackWarning):
        scores = fk.attribute("grad_dot", model, "mse", (x, y), (x[:2], y[:2]))
    torch.testing.assert_close(scores, G @ G[:2].T, **TOL)
