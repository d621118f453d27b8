import pytest
import torch
from helpers import randn, rel
from hypothesis import given, settings, strategies as st

from fimoda_kernels._ext import _C
from fimoda_kernels.ops.grad_dot import (_factored_reference, _grad_dot_reference, grad_dot,
                                         grad_dot_factored)


def _randn(*shape, dtype=torch.float32, device="cpu", seed=0):
    return randn(*shape, dtype=dtype, device=device, seed=seed, shift=0.05)


_rel = rel


def _tol():
    return 5e-4 if torch.cuda.is_available() else 1e-5  # GPU kernels may use tf32 tensor cores


@pytest.mark.parametrize("n,m,d", [(1, 1, 1), (37, 11, 50), (130, 65, 257), (3, 200, 7)])
@pytest.mark.parametrize("normalize", [False, True])
def test_grad_dot_matches_reference(backend_device, n, m, d, normalize):
    backend, device = backend_device
    tr, te = _randn(n, d, device=device, seed=1), _randn(m, d, device=device, seed=2)
    out = grad_dot(tr, te, normalize, backend=backend)
    assert out.shape == (n, m) and out.dtype == torch.float32 and out.device.type == device
    assert _rel(out, _grad_dot_reference(tr.cpu(), te.cpu(), normalize)) < _tol()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_grad_dot_dtypes(backend_device, dtype):
    backend, device = backend_device
    tr, te = _randn(33, 70, dtype=dtype, device=device), _randn(9, 70, dtype=dtype, device=device, seed=5)
    out = grad_dot(tr, te, True, backend=backend)
    assert out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    tol = 1e-12 if dtype == torch.float64 else 1e-5 if not torch.cuda.is_available() else 5e-3
    assert _rel(out, _grad_dot_reference(tr.cpu(), te.cpu(), True)) < tol


def test_grad_cos_zero_rows(backend_device):
    """Zero-gradient rows on either side score 0, not NaN; other pairs are cosines in [-1, 1]."""
    backend, device = backend_device
    tr, te = _randn(8, 20, device=device), _randn(5, 20, device=device, seed=3)
    tr[2] = 0
    te[4] = 0
    out = grad_dot(tr, te, True, backend=backend).cpu()
    assert torch.all(out[2] == 0) and torch.all(out[:, 4] == 0)
    assert torch.isfinite(out).all() and out.abs().max() <= 1 + 1e-6
    assert torch.allclose(grad_dot(tr, tr, True, backend=backend).cpu().diagonal()[[0, 1, 3]],
                          torch.ones(3), atol=1e-5)


@pytest.mark.parametrize("normalize", [False, True])
def test_topk_equals_sorting(backend_device, normalize, monkeypatch):
    import fimoda_kernels.ops.grad_dot as gd

    backend, device = backend_device
    monkeypatch.setattr(gd, "_CHUNK_BYTES", 4 * 7 * 13)  # 13 train rows per chunk: many merges
    tr, te = _randn(100, 16, device=device), _randn(7, 16, device=device, seed=4)
    values, indices = grad_dot(tr, te, normalize, topk=10, backend=backend)
    full = grad_dot(tr, te, normalize, backend=backend).T
    want_v, want_i = full.sort(1, descending=True)
    assert values.shape == (7, 10) and indices.shape == (7, 10)
    assert torch.equal(indices, want_i[:, :10]) and torch.allclose(values, want_v[:, :10])
    assert torch.equal(values, full.gather(1, indices))


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 40), m=st.integers(1, 20), d=st.integers(1, 60), normalize=st.booleans(),
       seed=st.integers(0, 1000))
def test_grad_dot_cpu_hypothesis(n, m, d, normalize, seed):
    tr, te = _randn(n, d, seed=seed), _randn(m, d, seed=seed + 1)
    assert _rel(grad_dot(tr, te, normalize, backend="cpu"), _grad_dot_reference(tr, te, normalize)) < 1e-5


def _layers(n, specs, seed, dtype=torch.float32, device="cpu"):
    """(a, s) pairs: spec (T, d_in, d_out), T None for 2-D tensors."""
    out = []
    for l, (T, d_in, d_out) in enumerate(specs):
        lead = (n,) if T is None else (n, T)
        out.append((_randn(*lead, d_in, dtype=dtype, device=device, seed=seed + 2 * l),
                    _randn(*lead, d_out, dtype=dtype, device=device, seed=seed + 2 * l + 1)))
    return out


def _as3(layers):
    return [(a if a.dim() == 3 else a[:, None], s if s.dim() == 3 else s[:, None]) for a, s in layers]


@pytest.mark.parametrize("specs", [[(None, 9, 4)], [(None, 65, 33), (None, 3, 1), (None, 129, 17)],
                                   [(None, 9, 4), (4, 5, 3)], [(3, 7, 2)]])
@pytest.mark.parametrize("normalize", [False, True])
def test_factored_matches_materialized(backend_device, specs, normalize):
    backend, device = backend_device
    tr, te = _layers(37, specs, 0, device=device), _layers(13, specs, 100, device=device)
    out = grad_dot_factored(tr, te, normalize, backend=backend)
    ref = _factored_reference(_as3([(a.cpu(), s.cpu()) for a, s in tr]),
                              _as3([(a.cpu(), s.cpu()) for a, s in te]), normalize)
    assert out.shape == (37, 13)
    assert _rel(out, ref) < _tol()


def test_factored_cpu_chunks(monkeypatch):
    import fimoda_kernels.ops.grad_dot as gd

    specs = [(None, 9, 4), (2, 5, 3)]
    tr, te = _layers(50, specs, 0), _layers(7, specs, 9)
    one = grad_dot_factored(tr, te, backend="cpu")
    monkeypatch.setattr(gd, "_CHUNK_BYTES", 300)
    assert torch.allclose(one, grad_dot_factored(tr, te, backend="cpu"), rtol=1e-5, atol=1e-5)


def test_factored_equals_dense_on_capture():
    """On a real model: capture's (a, s) through grad_dot_factored == grad_dot of torch.func gradients."""
    import fimoda_kernels as fk

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 10), torch.nn.Tanh(), torch.nn.Linear(10, 3)).double()
    x, y = torch.randn(20, 6, dtype=torch.float64), torch.randint(0, 3, (20,))
    cap_tr = fk.capture_linear(model).run("cross_entropy", x[:15], y[:15])
    tr = [(l.a, l.s) for l in cap_tr.layers]
    cap_te = fk.capture_linear(model).run("cross_entropy", x[15:], y[15:])
    te = [(l.a, l.s) for l in cap_te.layers]
    G = fk.per_sample_grads(model, "cross_entropy", x, y)
    for normalize in (False, True):
        assert torch.allclose(grad_dot_factored(tr, te, normalize), grad_dot(G[:15], G[15:], normalize),
                              rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("call,err,match", [
    (lambda: grad_dot(torch.randn(3, 4), torch.randn(2, 5)), ValueError, r"test: expected \[m, 4\]"),
    (lambda: grad_dot(torch.randn(3, 4), torch.randn(2, 4).double()), TypeError, "test: expected dtype"),
    (lambda: grad_dot(torch.randn(3), torch.randn(2, 4)), ValueError, "train: expected a 2-D"),
    (lambda: grad_dot(torch.randn(3, 4), torch.randn(2, 4), normalize=1), TypeError, "normalize: expected a bool"),
    (lambda: grad_dot(torch.randn(3, 4), torch.randn(2, 4), topk=0), ValueError, "topk: expected an integer >= 1"),
    (lambda: grad_dot(torch.randn(3, 4), torch.randn(2, 4), topk=4), ValueError, "topk: expected an integer <= 3"),
    (lambda: grad_dot(torch.full((3, 4), float("inf")), torch.randn(2, 4)), ValueError, "expected finite"),
    (lambda: grad_dot_factored([], []), ValueError, "train_layers: expected a non-empty list"),
    (lambda: grad_dot_factored([(torch.randn(3, 4), torch.randn(3, 2))], [(torch.randn(2, 5), torch.randn(2, 2))]),
     ValueError, r"test_layers\[0\]: expected widths"),
    (lambda: grad_dot_factored([(torch.randn(3, 4), torch.randn(3, 2))], []), ValueError, "test_layers: expected a non-empty"),
    (lambda: grad_dot_factored([(torch.randn(3, 4), torch.randn(2, 2))], [(torch.randn(2, 4), torch.randn(2, 2))]),
     ValueError, "same n and T"),
    (lambda: grad_dot_factored([(torch.randn(3, 4), torch.randn(3, 2), torch.randn(3))], [(torch.randn(2, 4),)]),
     ValueError, r"train_layers\[0\]: expected an \(a, s\) pair of tensors, got a tuple of 3"),
])
def test_bad_input(call, err, match):
    with pytest.raises(err, match=match):
        call()


@settings(max_examples=20, deadline=None)
@given(n=st.integers(1, 12), m=st.integers(1, 6), specs=st.lists(
    st.tuples(st.sampled_from([None, 1, 3]), st.integers(1, 9), st.integers(1, 5)), min_size=1, max_size=3),
    normalize=st.booleans(), seed=st.integers(0, 1000))
def test_factored_cpu_hypothesis(n, m, specs, normalize, seed):
    tr, te = _layers(n, specs, seed), _layers(m, specs, seed + 50)
    ref = _factored_reference(_as3(tr), _as3(te), normalize)
    out = grad_dot_factored(tr, te, normalize, backend="cpu")
    assert float((out.double() - ref).norm()) <= 1e-5 * float(ref.norm()) + 1e-6


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_empty_sets_and_zero_length_sequences(backend):
    """n = 0, m = 0 or T = 0 give empty / zero results (a reshape to [0, -1] raised), top-k included."""
    if backend == "cpu" and _C is None:
        pytest.skip("native module not built")
    tr, te = [(torch.ones(0, 3), torch.ones(0, 4))], [(torch.ones(3, 3), torch.ones(3, 4))]
    for normalize in (False, True):
        assert grad_dot_factored(tr, te, normalize, backend=backend).shape == (0, 3)
        assert grad_dot_factored(te, tr, normalize, backend=backend).shape == (3, 0)
    seq = [(torch.ones(2, 0, 3), torch.ones(2, 0, 4))], [(torch.ones(3, 0, 3), torch.ones(3, 0, 4))]
    assert torch.equal(grad_dot_factored(*seq, backend=backend), torch.zeros(2, 3))
    v, i = grad_dot(torch.randn(0, 4), torch.randn(3, 4), topk=1, backend=backend)
    assert v.shape == i.shape == (3, 0) and i.dtype == torch.int64


@pytest.mark.parametrize("scale", [1e-40, 1e-25, 1e19, 1e25])
def test_grad_cos_float32_whatever_the_magnitude(backend_device, scale):
    """float32 Grad-Cos of rows whose squares or products leave float32's range (tiny or huge
    gradients): normalized before the product, the cosines stay right (a self-cosine came out 0 or
    raised)."""
    backend, device = backend_device
    x = randn(3, 50, seed=4) * scale
    y = torch.cat([x[:1], randn(2, 50, seed=5) * scale])
    got = grad_dot(x.to(device), y.to(device), normalize=True, backend=backend).cpu()
    assert rel(got, _grad_dot_reference(x.double(), y.double(), True)) < 1e-6 and abs(float(got[0, 0]) - 1) < 1e-6


@pytest.mark.parametrize("scale", [1e-40, 1e-25, 1e19, 1e25])
@pytest.mark.parametrize("factor", ["s", "a"])
def test_factored_grad_cos_float32_whatever_the_magnitude(backend_device, scale, factor):
    """Factored float32 Grad-Cos of samples whose gradients or activations are tiny or huge (s or a
    scaled; T = 1 and T > 1 layers): each factor is brought near 1 by a power of two before the
    products, so the cosines match float64 (the squares underflowed to 0, or overflowed)."""
    backend, device = backend_device
    specs = [(None, 9, 4), (3, 5, 2)]
    tr, te = _layers(7, specs, 0), _layers(5, specs, 50)

    def scaled(a, s, c):
        return (a, s * c) if factor == "s" else (a * c, s)

    tr = [scaled(a, s, scale) for a, s in tr]
    te = [scaled(a, s, scale if l else scale * 3) for l, (a, s) in enumerate(te)]
    got = grad_dot_factored([(a.to(device), s.to(device)) for a, s in tr],
                            [(a.to(device), s.to(device)) for a, s in te], True, backend=backend).cpu()
    ref = _factored_reference(_as3([(a.double(), s.double()) for a, s in tr]),
                              _as3([(a.double(), s.double()) for a, s in te]), True)
    assert rel(got, ref) < 1e-5


def test_factored_grad_cos_with_a_zero_input_row(backend_device):
    """A sample whose input row of one layer is zero (a dead ReLU) beside a tiny layer: its output
    gradient there is scaled by its own size, not the sample's (which overflowed S Sᵀ into a NaN
    norm, and that sample's cosines came back 0)."""
    backend, device = backend_device
    g = torch.Generator().manual_seed(0)
    a0, s0 = torch.randn(3, 4, generator=g), torch.randn(3, 3, generator=g) * 2.0 ** 30
    a0[0] = 0
    a1, s1 = torch.randn(3, 5, generator=g) * 2.0 ** -50, torch.randn(3, 2, generator=g) * 2.0 ** -20
    tr = [(a0, s0), (a1, s1)]
    te = [(torch.randn(2, 4, generator=g), torch.randn(2, 3, generator=g)),
          (torch.randn(2, 5, generator=g), torch.randn(2, 2, generator=g))]
    got = grad_dot_factored([(a.to(device), s.to(device)) for a, s in tr],
                            [(a.to(device), s.to(device)) for a, s in te], True, backend=backend).cpu()
    ref = _factored_reference(_as3([(a.double(), s.double()) for a, s in tr]),
                              _as3([(a.double(), s.double()) for a, s in te]), True)
    assert rel(got, ref) < 1e-5 and bool(got[0].abs().min() > 0.1)


@pytest.mark.parametrize("scale", [1e-20, 1e20])
def test_half_precision_cosines_at_extreme_scales(backend_device, scale):
    """bfloat16 rows whose squares leave float32's range are normalized in float64 first; the unit
    rows were rounded back to bfloat16 (cosines 6e-4 off on every backend), now kept in float32."""
    backend, device = backend_device
    tr = (randn(4, 64, dtype=torch.float64, seed=1) * scale).bfloat16().to(device)
    te = randn(3, 64, seed=2).bfloat16().to(device)
    ref = _grad_dot_reference(tr.cpu(), te.cpu(), normalize=True)
    out = grad_dot(tr, te, normalize=True, backend=backend)
    assert float((out.double().cpu() - ref).abs().max()) < 1e-6
