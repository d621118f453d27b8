"""EK-FAC ops (fimoda_kernels/ops/ekfac.py) vs their float64 references, on every backend."""
import pytest
import torch
from helpers import randn, rel

from fimoda_kernels.ops.ekfac import (_ekfac_eigen_correction_reference, _ekfac_precondition_reference,
                                      _ekfac_scores_reference, _kfac_factors_reference, default_damping,
                                      ekfac_eigen_correction, ekfac_eigenbases, ekfac_precondition, ekfac_scores,
                                      kfac_eigenvalues, kfac_factors, layer_gradient_matrices)

# (T, d_in, d_out) of two layers per case: odd widths, T = 1 and T > 1 (a sequence / conv layer);
# T > 1 layers with T ≤ / > d_in and ≤ / > d_out (the cpu correction's rotation orders)
SHAPES = [((1, 5, 3), (1, 19, 21)), ((3, 6, 2), (5, 17, 9)), ((1, 1, 1), (4, 33, 7)), ((6, 4, 3), (9, 3, 11))]


def _tol(dtype):
    if dtype == torch.float64:
        return 1e-11
    return 5e-4 if torch.cuda.is_available() else 2e-5


def _layers(n, shapes, dtype, device, seed):
    out = []
    for l, (T, d_in, d_out) in enumerate(shapes):
        a = randn(n, T, d_in, dtype=dtype, device=device, seed=seed + 10 * l)
        s = randn(n, T, d_out, dtype=dtype, device=device, seed=seed + 10 * l + 5, shift=-0.2)
        out.append((a[:, 0], s[:, 0]) if T == 1 else (a, s))  # T = 1 as 2-D, as the capture gives it
    return out


def _batches(shapes, dtype, device, sizes=(7, 4)):
    return [_layers(n, shapes, dtype, device, seed=100 * b) for b, n in enumerate(sizes)]


def _rel_all(outs, refs):
    return max(rel(o, r) for o, r in zip(outs, refs))


@pytest.mark.parametrize("shapes", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_kfac_factors(backend_device, shapes, dtype):
    backend, device = backend_device
    batches = _batches(shapes, dtype, device)
    out = kfac_factors(iter(batches), dtype=dtype, backend=backend)  # a generator-like stream
    ref = _kfac_factors_reference([[(a.cpu(), s.cpu()) for a, s in b] for b in batches])
    assert all(A.dtype == dtype and A.device.type == device for A, _ in out)
    assert _rel_all([x for p in out for x in p], [x for p in ref for x in p]) < _tol(dtype)
    assert all(torch.equal(A, A.T) and torch.equal(S, S.T) for A, S in out)  # mirrored exactly


def test_kfac_factors_fp64_accumulation_of_fp32_inputs(backend_device):
    backend, device = backend_device
    batches = _batches(SHAPES[1], torch.float32, device)
    out = kfac_factors(batches, dtype=torch.float64, backend=backend)
    ref = _kfac_factors_reference([[(a.cpu(), s.cpu()) for a, s in b] for b in batches])
    assert out[0][0].dtype == torch.float64
    assert _rel_all([x for p in out for x in p], [x for p in ref for x in p]) < 1e-12


@pytest.mark.parametrize("shapes", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_eigen_correction(backend_device, shapes, dtype):
    backend, device = backend_device
    batches = _batches(shapes, dtype, device)
    bases = ekfac_eigenbases(kfac_factors(batches, dtype=dtype, backend="torch"))
    out = ekfac_eigen_correction(iter(batches), bases, backend=backend)
    ref = _ekfac_eigen_correction_reference([[(a.cpu(), s.cpu()) for a, s in b] for b in batches],
                                            [tuple(t.cpu() for t in e) for e in bases])
    assert all(L.shape == (S.shape[0], A.shape[0]) and L.dtype == dtype
               for L, (A, _, S, _) in zip(out, bases))
    assert _rel_all(out, ref) < _tol(dtype)
    # a layer may come as its per-sample gradient matrices instead of (a, s) (what EKFAC caches)
    mixed = [[layer_gradient_matrices(*b[0], dtype), b[1]] for b in batches]
    assert mixed[0][0].shape == (7, bases[0][2].shape[0], bases[0][0].shape[0])
    assert _rel_all(ekfac_eigen_correction(mixed, bases, backend=backend), ref) < _tol(dtype)


@pytest.mark.parametrize("shapes", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("form", ["factored", "materialized", "auto"])
def test_precondition_and_scores(backend_device, shapes, dtype, form):
    backend, device = backend_device
    batches = _batches(shapes, dtype, device)
    bases = ekfac_eigenbases(kfac_factors(batches, dtype=dtype, backend="torch"))
    Lam = ekfac_eigen_correction(batches, bases, backend="torch")
    test = _layers(6, shapes, dtype, device, seed=7)
    W = ekfac_precondition(test, bases, Lam)  # default damping
    lams = [default_damping(L) for L in Lam]
    cpu = lambda xs: [tuple(t.cpu() for t in x) for x in xs]  # noqa: E731
    W_orig = ekfac_precondition(test, bases, Lam, basis="original")
    assert _rel_all(W_orig, _ekfac_precondition_reference(cpu(test), cpu(bases), [L.cpu() for L in Lam], lams)) \
        < (1e-10 if dtype == torch.float64 else 1e-4)
    train = batches[0]
    out = ekfac_scores(train, bases, W, form=form, backend=backend)
    assert out.shape == (7, 6) and out.dtype == dtype
    assert rel(out, _ekfac_scores_reference(cpu(train), cpu(bases), [w.cpu() for w in W])) < _tol(dtype)
    # the rotated-basis score equals the original-basis inner product ⟨G_i, (G + λI)^{-1} V_z⟩
    G = [torch.einsum("nto,nti->noi", *(t.double() if t.dim() == 3 else t.double()[:, None] for t in (s, a)))
         for a, s in train]
    dense = sum(g.flatten(1) @ w.double().flatten(1).T for g, w in zip(G, W_orig))
    assert rel(out, dense.cpu()) < (1e-10 if dtype == torch.float64 else 1e-4)
    # and basis="original" scores the unrotated vectors against W_orig: the same numbers
    out_o = ekfac_scores(train, bases, W_orig, form=form, backend=backend, basis="original")
    assert out_o.shape == (7, 6) and out_o.dtype == dtype
    assert rel(out_o, dense.cpu()) < (1e-10 if dtype == torch.float64 else 1e-4)


def test_kfac_equals_ekfac_for_independent_factors(backend_device):
    """With the data set the Cartesian product {a_p} × {s_q} (a and s independent per sample),
    Λ_EKFAC[o, j] = mean_q s̃_q[o]² · mean_p ã_p[j]² = λ_S[o] λ_A[j]: the K-FAC eigenvalues."""
    backend, device = backend_device
    P, Qn, d_in, d_out = 9, 7, 6, 5
    a_p = randn(P, d_in, dtype=torch.float64, device=device, seed=1)
    s_q = randn(Qn, d_out, dtype=torch.float64, device=device, seed=2)
    a = a_p.repeat_interleave(Qn, 0)
    s = s_q.repeat(P, 1)
    batches = [[(a[:40], s[:40])], [(a[40:], s[40:])]]
    bases = ekfac_eigenbases(kfac_factors(batches, dtype=torch.float64, backend=backend))
    Lam = ekfac_eigen_correction(batches, bases, backend=backend)[0]
    _, lam_A, _, lam_S = bases[0]
    assert rel(Lam, kfac_eigenvalues(lam_A, lam_S).cpu()) < 1e-12
    # and correlated factors break it (the test can fail)
    corr = [[(a, torch.cat([a[:, :d_out] * 3, s], 0)[:a.shape[0]])]]
    b2 = ekfac_eigenbases(kfac_factors(corr, dtype=torch.float64))
    L2 = ekfac_eigen_correction(corr, b2, backend=backend)[0]
    assert rel(L2, kfac_eigenvalues(b2[0][1], b2[0][3]).cpu()) > 1e-3


def test_nonfinite_names_layer_and_batch(backend_device):
    backend, device = backend_device
    batches = _batches(SHAPES[1], torch.float32, device, sizes=(5, 5, 5))
    batches[2][1][0][3, 1, 4] = float("nan")  # layer 1, batch 2, an input a
    with pytest.raises(ValueError, match=r"inputs a of layer 'fc2' in batch 2"):
        kfac_factors(batches, names=["fc1", "fc2"], backend=backend)
    batches[2][1][0][3, 1, 4] = 1.0
    batches[1][0][1][0, 0, 1] = float("inf")  # layer 0, batch 1, an output gradient s
    with pytest.raises(ValueError, match=r"output gradients s of layer 'fc1' in batch 1"):
        kfac_factors(batches, names=["fc1", "fc2"], backend=backend)


def test_eigh_guard_and_argument_errors():
    A = torch.eye(3)
    A[1, 1] = float("nan")
    with pytest.raises(ValueError, match=r"layer 'l0' factor A .*NaN or Inf"):
        ekfac_eigenbases([(A, torch.eye(2))], names=["l0"])
    batches = _batches(SHAPES[0], torch.float32, "cpu")
    with pytest.raises(ValueError, match="dtype"):
        kfac_factors(batches, dtype=torch.float16)
    with pytest.raises(ValueError, match="at least one batch"):
        kfac_factors([])
    with pytest.raises(ValueError, match=r"batches\[1\]: expected 2 layers"):
        kfac_factors([batches[0], batches[1][:1]])
    bases = ekfac_eigenbases(kfac_factors(batches))
    Lam = ekfac_eigen_correction(batches, bases)
    G = layer_gradient_matrices(*batches[0][1], torch.float32)
    with pytest.raises(ValueError, match="dtype: expected torch.float32 or torch.float64"):
        layer_gradient_matrices(*batches[0][1], torch.float16)
    with pytest.raises(ValueError, match=r"a .* and s .*: expected"):
        layer_gradient_matrices(batches[0][1][0], batches[0][0][1][:2], torch.float32)
    with pytest.raises(ValueError, match=r"batches\[0\]\[1\]: expected an \(a, s\) pair, got Tensor"):
        kfac_factors([[batches[0][0], G]])
    with pytest.raises(ValueError, match=r"batches\[0\]\[0\]: expected gradient matrices \[7, 3, 5\]"):
        ekfac_eigen_correction([[G, batches[0][1]]], bases)
    short = (batches[0][1][0][:3], batches[0][1][1][:3])  # a pair with fewer samples than layer 0
    with pytest.raises(ValueError, match=r"batches\[0\]\[1\]: expected 7 samples \(as layer 0\), got 3"):
        ekfac_eigen_correction([[batches[0][0], short]], bases)
    with pytest.raises(ValueError, match="damping"):
        ekfac_precondition(batches[0], bases, Lam, damping=-1.0)
    with pytest.raises(ValueError, match="basis"):
        ekfac_precondition(batches[0], bases, Lam, basis="weird")
    with pytest.raises(ValueError, match="widths"):
        ekfac_precondition([batches[0][1], batches[0][0]], bases, Lam)
    with pytest.raises(ValueError, match="Λ \\+ λ must be positive"):
        ekfac_precondition(batches[0], bases, [-L - 1 for L in Lam], damping=0.0)
    W = ekfac_precondition(batches[0], bases, Lam)
    with pytest.raises(ValueError, match="form"):
        ekfac_scores(batches[0], bases, W, form="dense")
    with pytest.raises(ValueError, match="basis"):
        ekfac_scores(batches[0], bases, W, basis="eigen")
    with pytest.raises(ValueError, match="expected 2 layers"):
        ekfac_scores(batches[0][:1], bases, W)
    # the per-layer entries and factors must have the documented form
    with pytest.raises(ValueError, match=r"train_layers\[0\]: expected an \(a, s\) pair of tensors, got a tuple of 3"):
        ekfac_scores([batches[0][0] + (G,), batches[0][1]], bases, W)
    with pytest.raises(ValueError, match=r"factors\[0\]: expected an \(A, S\) pair, got tuple of 3"):
        ekfac_eigenbases([(torch.eye(3), torch.eye(2), torch.eye(2))])
    with pytest.raises(ValueError, match=r"layer 0 A \(input covariance\): expected a square matrix, got shape \(3, 2\)"):
        ekfac_eigenbases([(torch.ones(3, 2), torch.eye(2))])
    with pytest.raises(ValueError, match="dtype: expected torch.float32 or torch.float64"):
        ekfac_precondition(batches[0], bases, Lam, dtype=torch.int32)
    with pytest.raises(ValueError, match=r"eigenvalues\[0\]: expected finite values"):
        ekfac_precondition(batches[0], bases, [torch.full_like(Lam[0], float("nan")), Lam[1]])


def test_empty_sample_sets_are_refused_not_nan():
    """The streamed averages divide by the sample count: all-empty batches returned NaN factors."""
    empty = [[(torch.randn(0, 3), torch.randn(0, 2))]]
    with pytest.raises(ValueError, match="batches: expected at least one sample, got batches of 0 samples"):
        kfac_factors(empty)
    bases = [(torch.eye(3), torch.ones(3), torch.eye(2), torch.ones(2))]
    with pytest.raises(ValueError, match="batches: expected at least one sample"):
        ekfac_eigen_correction(empty, bases)


@pytest.mark.parametrize("form", ["factored", "materialized"])
@pytest.mark.parametrize("n,T,m,d_in,d_out", [(4, 1, 0, 3, 2), (4, 0, 2, 3, 2), (4, 1, 2, 0, 2), (4, 2, 2, 3, 0)])
def test_zero_sized_dimensions(backend_device, form, n, T, m, d_in, d_out):
    """A dimension of size 0 (no test points, positions, inputs or outputs) gives zeros on every
    backend and form, as the reference does (the cpu forms divided by it)."""
    backend, device = backend_device
    a, s = randn(n, T, d_in, device=device), randn(n, T, d_out, device=device, seed=1)
    W = randn(m, d_out, d_in, device=device, seed=2)
    bases = [(torch.eye(d_in, device=device), torch.ones(d_in, device=device),
              torch.eye(d_out, device=device), torch.ones(d_out, device=device))]
    out = ekfac_scores([(a, s)], bases, [W], form=form, backend=backend)
    assert out.shape == (n, m) and not bool(out.any())
    if T and d_in * d_out == 0:
        A, S = kfac_factors([[(a, s)]], backend=backend)[0]
        assert A.shape == (d_in, d_in) and S.shape == (d_out, d_out)
