import math

import pytest
import torch
from helpers import randn, rel
from hypothesis import given, settings, strategies as st

import fimoda_kernels.ops.project as pr
from fimoda_kernels.ops.project import (_project_linear_reference, _project_reference, kronecker_dims,
                                        project, project_linear)

LOW_PRECISION = {torch.float16: 2e-3, torch.bfloat16: 1e-2}


_rel = rel


def _err(out, ref, G):
    """‖out − ref‖ relative to ‖ref‖, with float32 Gaussian generation error allowed for: each P
    entry carries ~3e-7/√k absolute error, so ‖out − ref‖ may reach ~3e-7·‖G‖_F however small
    ‖ref‖ happens to be (e.g. a single near-zero entry)."""
    diff = float((out.double().cpu() - ref.cpu()).norm())
    return diff / (float(ref.cpu().norm()) + 0.1 * float(G.double().cpu().norm()))


def _tol(backend, dtype):
    # fp32 accumulation vs the fp64 reference (cuda's tensor-core path keeps float32 accuracy)
    return 5e-4 if backend == "triton" and torch.cuda.is_available() else 1e-5


def _randn(*shape, dtype=torch.float32, device="cpu", seed=0):
    return randn(*shape, dtype=dtype, device=device, seed=seed, shift=0.1)


@pytest.mark.parametrize("n,p,k", [(1, 1, 1), (7, 300, 33), (33, 129, 512), (64, 1000, 5), (5, 70, 1031)])
@pytest.mark.parametrize("kind", ["rademacher", "gaussian"])
def test_project_matches_reference(backend_device, n, p, k, kind):
    backend, device = backend_device
    grads = _randn(n, p, device=device, seed=n + p + k)
    out = project(grads, k, 1234567, kind, 2**32 - 50, backend=backend)
    assert out.shape == (n, k) and out.dtype == torch.float32 and out.device.type == device
    ref = _project_reference(grads.cpu().double(), k, 1234567, kind, 2**32 - 50)
    assert _err(out, ref, grads) < _tol(backend, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_project_dtypes(backend_device, dtype):
    backend, device = backend_device
    grads = _randn(9, 257, dtype=dtype, device=device)
    out = project(grads, 40, 3, "rademacher", 0, backend=backend)
    assert out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    ref = _project_reference(grads.cpu(), 40, 3, "rademacher", 0)  # from the rounded inputs
    low_tol = 5e-3 if backend == "triton" and torch.cuda.is_available() else 1e-5
    assert _rel(out, ref) < (1e-12 if dtype == torch.float64 else low_tol)


def test_project_cpu_tiles(monkeypatch):
    """Many P tiles (chunk boundaries mid-row-range) give the same result as one."""
    grads = _randn(6, 1001)
    one = project(grads, 24, 8, "gaussian", 5, backend="cpu")
    monkeypatch.setattr(pr, "_TILE_BYTES", 4 * 24 * 37)  # 37-row tiles
    many = project(grads, 24, 8, "gaussian", 5, backend="cpu")
    assert torch.allclose(one, many, rtol=1e-5, atol=1e-5)
    assert _rel(many, _project_reference(grads.double(), 24, 8, "gaussian", 5)) < 1e-5


@pytest.mark.parametrize("kind", ["rademacher", "gaussian"])
@pytest.mark.parametrize("col_block", [5, 64, 100])
def test_project_cpu_column_blocks(monkeypatch, kind, col_block):
    """P wider than the column block is generated and multiplied in column blocks (unaligned to the
    Philox groups, a partial last block) and row tiles: the same projection."""
    grads = _randn(7, 301)
    monkeypatch.setattr(pr, "_COL_BLOCK", col_block)
    monkeypatch.setattr(pr, "_TILE_BYTES", 4 * col_block * 41)  # 41-row tiles
    out = project(grads, 230, 2**33 + 9, kind, 2**32 - 100, backend="cpu")
    assert _rel(out, _project_reference(grads.double(), 230, 2**33 + 9, kind, 2**32 - 100)) < 1e-5
    a, s = _randn(5, 2, 17), _randn(5, 2, 6, seed=4)
    lin = project_linear(a, s, 230, 3, 7, backend="cpu", kind=kind)
    assert _rel(lin, _project_linear_reference(a, s, 230, 3, kind, 7, True)) < 1e-5


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_project_degenerate_shapes(backend):
    """No samples, no parameters, no inputs (bias rows only), no outputs (empty bias block), no
    positions: zeros or the reference, never an error."""
    assert torch.equal(project(_randn(0, 5), 4, 1, backend=backend), torch.zeros(0, 4))
    assert project(_randn(0, 5), 2**32 - 1, 1, backend=backend).shape == (0, 2**32 - 1)  # no P built
    assert torch.equal(project(_randn(3, 0), 4, 1, backend=backend), torch.zeros(3, 4))
    for a, s in [(_randn(0, 2, 3), _randn(0, 2, 2)), (_randn(4, 2, 0), _randn(4, 2, 3, seed=1)),
                 (_randn(4, 2, 3), _randn(4, 2, 0)), (_randn(4, 0, 3), _randn(4, 0, 2))]:
        for bias in (True, False):
            out = project_linear(a, s, 8, 5, 10, bias=bias, backend=backend)
            want = _project_linear_reference(a, s, 8, 5, "rademacher", 10, bias).float()
            assert out.shape == (a.shape[0], 8) and torch.allclose(out, want, atol=1e-6)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", ["rademacher", "gaussian"])
def test_project_cuda_tensor_cores(monkeypatch, dtype, kind):
    """The tensor-core path (bfloat16 parts, float32 accumulation) over many P tiles is float32-exact:
    it meets the float64 reference from the same (rounded) inputs like float32 FMA arithmetic does,
    agrees with the fused FMA kernel, and is bitwise reproducible."""
    if not pr._tensor_cores(torch.device("cuda")):
        pytest.skip("no tensor-core path on this GPU / torch (sm_80+ and addmm(out_dtype=float32))")
    grads = _randn(37, 3001, dtype=dtype, device="cuda", seed=5)
    monkeypatch.setattr(pr, "_MMA_TILE_BYTES", 2 * 130 * 640)  # 640-row (Gaussian: 213-row) tiles, a partial last
    out = project(grads, 130, 2**63 + 9, kind, 2**32 - 700, backend="cuda")
    assert out.shape == (37, 130) and out.dtype == torch.float32
    assert torch.equal(out, project(grads, 130, 2**63 + 9, kind, 2**32 - 700, backend="cuda"))
    ref = _project_reference(grads.cpu().double(), 130, 2**63 + 9, kind, 2**32 - 700)
    assert _err(out, ref, grads) < 2e-6
    monkeypatch.setattr(pr, "USE_TENSOR_CORES", False)
    fused = project(grads, 130, 2**63 + 9, kind, 2**32 - 700, backend="cuda")
    assert _err(fused, ref, grads) < 2e-6


@pytest.mark.cuda
def test_rademacher_bf16_fill():
    """The tensor-core path's bfloat16 Rademacher tile: exactly the unscaled ±1 of MATH.md §9 (odd k, a
    partial last group of four, rows across 2^32)."""
    from fimoda_kernels.ops.projection_matrix import _projection_matrix_reference

    P = torch.empty(19, 7, dtype=torch.bfloat16, device="cuda")
    pr._MMAPrimitives.fill(P, 2**63 + 1, "rademacher", 2**32 - 3)
    ref = _projection_matrix_reference(19, 7, 2**63 + 1, "rademacher", 2**32 - 3, torch.float64, "cpu")
    assert torch.equal(P.cpu().double(), torch.sign(ref))


def test_bf16_fill_rejects_gaussian():
    with pytest.raises(ValueError, match="kind: a bfloat16 P tile holds Rademacher entries only"):
        pr._MMAPrimitives.fill(torch.empty(2, 2, dtype=torch.bfloat16), 1, "gaussian", 0)


@pytest.mark.cuda
@pytest.mark.parametrize("T", [1, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_project_linear_cuda_tensor_cores(monkeypatch, T, dtype):
    """project_linear's tensor-core path, its weight gradient formed a few output rows at a time."""
    if not pr._tensor_cores(torch.device("cuda")):
        pytest.skip("no tensor-core path on this GPU / torch")
    n, d_in, d_out, k = 21, 45, 23, 96
    a, s = _randn(n, T, d_in, dtype=dtype, seed=8), _randn(n, T, d_out, dtype=dtype, seed=9)
    monkeypatch.setattr(pr, "_MMA_SPLIT_BYTES", 2 * n * 3 * 4 * d_in)  # 4 output rows per block
    out = project_linear(a.cuda(), s.cuda(), k, 31, 2**40, bias=True, kind="gaussian", backend="cuda")
    ref = _project_linear_reference(a.double(), s.double(), k, 31, "gaussian", 2**40, True)
    assert _rel(out, ref) < 2e-6


class _CPUPrimitives:
    """CPU stand-ins for the device steps of cuda's tensor-core path (Philox fill, bfloat16 split,
    float32-accumulating GEMM), so its tiling is tested on every machine."""

    @staticmethod
    def fill(P, seed, kind, row_offset):
        from fimoda_kernels.ops.projection_matrix import _projection_matrix_reference

        rows, k = P.shape
        P.copy_(_projection_matrix_reference(rows, k, seed, kind, row_offset, torch.float64, "cpu") * math.sqrt(k))

    @staticmethod
    def split(x, parts, out):
        r = x.float()
        for q in range(parts):
            out[q] = r.bfloat16()
            r = r - out[q].float()

    @staticmethod
    def addmm(out, a, b):
        return out + (a.double() @ b.double()).float()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", ["rademacher", "gaussian"])
@pytest.mark.parametrize("stacked", [True, False])
def test_tensor_core_tiling(monkeypatch, dtype, kind, stacked):
    """The tensor-core path's tiles, offsets and part pairs give float32 accuracy (device steps emulated),
    with the X parts stacked into one GEMM per P part, or (large n·k) one GEMM per part pair."""
    monkeypatch.setattr(pr, "_MMA_TILE_BYTES", 2 * 33 * 192)  # 192-row tiles (Gaussian: 64): many, a partial last
    monkeypatch.setattr(pr, "_MMA_STACK_BYTES", 2**30 if stacked else 0)
    grads = _randn(7, 1001, dtype=dtype, seed=11)
    out = pr._project_mma(grads, 33, 2**63 + 5, kind, 2**32 - 100, prims=_CPUPrimitives)
    ref = _project_reference(grads.double(), 33, 2**63 + 5, kind, 2**32 - 100)
    assert _err(out, ref, grads) < 2e-6
    row = _randn(1001, 1, seed=12).T  # one row with stride(0) = 1
    assert _rel(pr._project_mma(row, 33, 1, kind, 0, prims=_CPUPrimitives),
                _project_reference(row.double(), 33, 1, kind, 0)) < 2e-6


@pytest.mark.parametrize("T,d_in,d_out,bias", [(1, 150, 300, True), (3, 200, 70, True), (1, 9, 5, False),
                                               (4, 45, 23, True)])
def test_tensor_core_linear_tiling(monkeypatch, T, d_in, d_out, bias):
    """project_linear's tensor-core path: weight rows and the bias block wider than one P tile are cut
    into column chunks at the right offsets (device steps emulated)."""
    n, k = 5, 33
    monkeypatch.setattr(pr, "_MMA_SPLIT_BYTES", 2 * n * 3 * 64)  # 64-row P tiles
    a, s = _randn(n, T, d_in, seed=13), _randn(n, T, d_out, seed=14)
    out = pr._project_linear_mma(a, s, k, 7, "gaussian", 2**33 + 1, bias, prims=_CPUPrimitives)
    ref = _project_linear_reference(a.double(), s.double(), k, 7, "gaussian", 2**33 + 1, bias)
    assert _rel(out, ref) < 2e-6


def test_tensor_core_tile_guard():
    X = _randn(3, 10)
    with pytest.raises(RuntimeError, match="exceeds the 8-row P tile"):
        pr._project_blocks_mma([(0, X)], 3, 4, 1, "rademacher", torch.float32, "cpu", 8, prims=_CPUPrimitives)


def test_project_equals_materialized_matrix():
    """project == grads @ projection_matrix: one P for every entry point."""
    from fimoda_kernels import projection_matrix

    grads = _randn(11, 200, dtype=torch.float64)
    P = projection_matrix(200, 77, 99, "gaussian", 123, dtype=torch.float64)
    assert torch.allclose(project(grads, 77, 99, "gaussian", 123), grads @ P, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("T", [None, 1, 5])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("kind", ["rademacher", "gaussian"])
def test_project_linear_matches_materialized(backend_device, T, bias, kind):
    backend, device = backend_device
    n, d_in, d_out, k = 13, 19, 7, 66
    a = _randn(n, d_in, seed=1) if T is None else _randn(n, T, d_in, seed=1)
    s = _randn(n, d_out, seed=2) if T is None else _randn(n, T, d_out, seed=2)
    out = project_linear(a.to(device), s.to(device), k, 77, row_offset=2**33 + 3, bias=bias, kind=kind,
                         backend=backend)
    a3, s3 = (a, s) if T is not None else (a[:, None], s[:, None])
    G = torch.einsum("nto,ntc->noc", s3.double(), a3.double()).flatten(1)
    if bias:
        G = torch.cat([G, s3.double().sum(1)], 1)
    ref = _project_reference(G, k, 77, kind, 2**33 + 3)
    assert _err(out, ref, G) < _tol(backend, torch.float32)
    assert torch.allclose(ref, _project_linear_reference(a3, s3, k, 77, kind, 2**33 + 3, bias))


def test_project_linear_cpu_blocks(monkeypatch):
    a, s = _randn(5, 3, 17), _randn(5, 3, 11, seed=4)
    one = project_linear(a, s, 10, 1, 0, backend="cpu")
    monkeypatch.setattr(pr, "_TILE_BYTES", 4 * 17 * 10 * 2)  # 2 output rows per block
    assert torch.allclose(one, project_linear(a, s, 10, 1, 0, backend="cpu"), rtol=1e-5, atol=1e-5)


@settings(max_examples=20, deadline=None)
@given(n=st.integers(1, 9), T=st.integers(1, 4), d_in=st.integers(1, 20), d_out=st.integers(1, 9),
       k=st.integers(1, 70), bias=st.booleans(), seed=st.integers(0, 2**64 - 1))
def test_project_linear_cpu_hypothesis(n, T, d_in, d_out, k, bias, seed):
    a, s = _randn(n, T, d_in, seed=seed % 1000), _randn(n, T, d_out, seed=seed % 997)
    out = project_linear(a, s, k, seed, 11, bias=bias, backend="cpu")
    assert _rel(out, _project_linear_reference(a, s, k, seed, "rademacher", 11, bias)) < 1e-5


def test_kronecker():
    assert kronecker_dims(64) == (8, 8) and kronecker_dims(2048) == (32, 64) and kronecker_dims(13) == (1, 13)
    n, T, d_in, d_out, k = 6, 3, 10, 4, 36
    a, s = _randn(n, T, d_in, dtype=torch.float64), _randn(n, T, d_out, dtype=torch.float64, seed=3)
    out = project_linear(a, s, k, 5, 100, bias=True, kind="kronecker")
    # equals the dense projection of the [d_out, d_in + 1] gradient matrix by P_out ⊗ P_in
    from fimoda_kernels import projection_matrix

    k_out, k_in = kronecker_dims(k)
    P_in = projection_matrix(d_in + 1, k_in, 5, "rademacher", 100, dtype=torch.float64)
    P_out = projection_matrix(d_out, k_out, 5 ^ pr._KRONECKER_OUT_SEED, "rademacher", 100, dtype=torch.float64)
    a1 = torch.cat([a, torch.ones(n, T, 1, dtype=torch.float64)], 2)
    G = torch.einsum("nto,ntc->noc", s, a1).flatten(1)  # [n, d_out·(d_in+1)], row-major
    assert torch.allclose(out, G @ torch.kron(P_out, P_in), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind", ["rademacher", "gaussian", "kronecker"])
def test_jl_property(kind):
    """Projected inner products are unbiased for the gradient inner products, spread O(1/√k):
    over 40 seeds the mean relative error of ⟨φ_i, φ_j⟩ is near 0 and its sd near √(1+cos²)/√k."""
    n, d_in, d_out, k = 2, 30, 20, 256
    a, s = _randn(n, d_in, dtype=torch.float64, seed=8), _randn(n, d_out, dtype=torch.float64, seed=9)
    G = torch.einsum("no,nc->noc", s, a).flatten(1)
    exact = (G[0] @ G[1]).item()
    scale = (G[0].norm() * G[1].norm()).item()
    errs = []
    for seed in range(40):
        phi = project_linear(a, s, k, seed, 0, bias=False, kind=kind)
        errs.append(((phi[0] @ phi[1]).item() - exact) / scale)
    errs = torch.tensor(errs)
    assert abs(errs.mean().item()) < 3 * 2 / math.sqrt(k) / math.sqrt(40)
    assert errs.std().item() < 3 / math.sqrt(k)


@pytest.mark.parametrize("call,err,match", [
    (lambda: project(torch.randn(3, 4), 0, 1), ValueError, "k: expected an integer >= 1"),
    (lambda: project(torch.randn(3), 4, 1), ValueError, "grads: expected a 2-D tensor"),
    (lambda: project(torch.randn(3, 4).int(), 4, 1), TypeError, "grads: expected dtype"),
    (lambda: project(torch.randn(3, 4), 4, -2), ValueError, "seed: expected an integer >= 0"),
    (lambda: project(torch.randn(3, 4), 4, 1, kind="kronecker"), ValueError, "kind: expected one of"),
    (lambda: project(torch.tensor([[1.0, float("nan")]]), 4, 1), ValueError, "grads: expected finite"),
    (lambda: project(torch.full((1, 4), 3e38), 4, 1), ValueError, "grads: the projection of these finite inputs "
                                                                  "overflows torch.float32"),
    (lambda: project_linear(torch.full((1, 4), 3e20), torch.full((1, 2), 3e20), 4, 1), ValueError,
     "a, s: the projection of these finite inputs overflows"),
    (lambda: project(torch.randn(2, 3), 4, 1, row_offset=2**63 - 2), ValueError,
     r"row_offset: expected row_offset \+ p <= 2\^63 .*p = 3 rows"),
    (lambda: project_linear(torch.randn(3, 4), torch.randn(2, 5), 4, 1), ValueError, "same n and T"),
    (lambda: project_linear(torch.randn(3, 2, 4), torch.randn(3, 3, 5), 4, 1), ValueError, "same n and T"),
    (lambda: project_linear(torch.randn(3, 4), torch.randn(3, 5).double(), 4, 1), TypeError, "s: expected dtype"),
    (lambda: project_linear(torch.randn(3, 4), torch.randn(3, 5), 4, 1, bias=1), TypeError, "bias: expected a bool"),
    (lambda: project_linear(torch.randn(3, 4), torch.randn(3, 5), 4, 1, kind="sparse"), ValueError, "kind: expected"),
])
def test_bad_input(call, err, match):
    with pytest.raises(err, match=match):
        call()
