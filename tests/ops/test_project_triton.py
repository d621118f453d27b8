"""Triton-specific checks of project / project_linear: split-K (deterministic, equal to no split),
tile edges with small blocks, the P inside the kernel being projection_matrix's P bit for bit,
and degenerate shapes. Runs in the triton pytest process (TRITON_INTERPRET=1 on CPU)."""
import pytest
import torch

from fimoda_kernels import projection_matrix
from fimoda_kernels.ops.project import _project_linear_reference, _project_reference, project, project_linear

from helpers import TRITON_DEVICE, TRITON_TOL, randn, rel, triton_module

pytestmark = pytest.mark.triton

DEVICE, TOL = TRITON_DEVICE, TRITON_TOL


@pytest.fixture
def tp():
    return triton_module("project")


def _randn(*shape, dtype=torch.float32, seed=0):
    return randn(*shape, dtype=dtype, device=DEVICE, seed=seed, shift=0.1)


_rel = rel


def _small_blocks(tp, monkeypatch):
    """16×16×16 tiles everywhere, so small shapes cross many tile edges."""
    monkeypatch.setattr(tp, "_INTERPRET_CONFIG", (16, 16, 16, 4))
    monkeypatch.setattr(tp, "_GPU_CONFIG", (16, 16, 16, 4))
    monkeypatch.setattr(tp, "_GPU_CONFIG_FP64", (16, 16, 16, 4))


def _force_split(tp, monkeypatch, target):
    """Ask for ``target`` programs with splits as short as one 16-parameter block."""
    monkeypatch.setattr(tp, "_INTERPRET_TARGET_PROGRAMS", target)
    monkeypatch.setattr(tp, "_target_programs", lambda device: target)
    monkeypatch.setattr(tp, "_MIN_SPLIT_P", 16)


def test_split_heuristic(tp, monkeypatch):
    monkeypatch.setattr(tp, "_MIN_SPLIT_P", 512)
    monkeypatch.setattr(tp, "_target_programs", lambda device: 264)
    dev = torch.device(DEVICE)
    assert tp._split(300, 10**6 + 1, 32, dev) == (1, 10**6 + 32)  # enough tiles: no split
    split, chunk = tp._split(4, 10**6, 32, dev)
    assert split == 66 and chunk % 32 == 0 and (split - 1) * chunk < 10**6 <= split * chunk
    assert tp._split(4, 1000, 32, dev)[0] == 2  # short p: splits of >= 512 parameters
    assert tp._split(1, 20, 32, dev) == (1, 32)


@pytest.mark.parametrize("kind", ["rademacher", "gaussian"])
def test_split_k_deterministic_and_equal(tp, monkeypatch, kind):
    grads = _randn(13, 70, seed=3)
    one = tp.project(grads, 20, 11, kind, 7)
    _small_blocks(tp, monkeypatch)
    _force_split(tp, monkeypatch, target=8)
    assert tp._split(1 * 2, 70, 16, torch.device(DEVICE)) == (3, 32)  # 1×2 tiles; splits of 32, 32, 6
    a, b = tp.project(grads, 20, 11, kind, 7), tp.project(grads, 20, 11, kind, 7)
    assert torch.equal(a, b)  # fixed-order reduction: bitwise reproducible
    assert torch.allclose(a, one, rtol=1e-5, atol=1e-5)
    assert _rel(a, _project_reference(grads.cpu().double(), 20, 11, kind, 7)) < TOL


def test_float64_tiles_fit_one_triton_tensor(tp):
    """float64's [BLOCK_N, BLOCK_P, BLOCK_K] broadcast product within Triton's 2^20 elements (n = 33,
    k = 129 raised under the interpreter before)."""
    bn, bk, bp, _ = tp._config(1000, 10**4, torch.float64, torch.device("cpu"))
    assert bn * bk * bp <= 2**20
    g = _randn(33, 5, dtype=torch.float64)
    assert _rel(project(g, 129, 1, backend="triton"), _project_reference(g, 129, 1)) < 1e-13


@pytest.mark.parametrize("n,p,k", [(16, 16, 16), (17, 33, 3), (1, 47, 17), (33, 5, 50)])
@pytest.mark.parametrize("kind", ["rademacher", "gaussian"])
def test_tile_edges(tp, monkeypatch, n, p, k, kind):
    _small_blocks(tp, monkeypatch)
    grads = _randn(n, p, seed=n * p + k)
    out = tp.project(grads, k, 2**40 + 5, kind, 2**32 - 20)
    assert out.shape == (n, k) and out.dtype == torch.float32
    assert _rel(out, _project_reference(grads.cpu().double(), k, 2**40 + 5, kind, 2**32 - 20)) < TOL


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kind", ["rademacher", "gaussian"])
@pytest.mark.parametrize("row_offset,seed", [(3, 99), (2**63 - 37, 2**32 + 1), (1, 1)])
def test_identity_gives_projection_matrix(tp, dtype, kind, row_offset, seed):
    """project(I) is exactly P: the kernel's P tiles are projection_matrix's (also at the largest
    allowed offset, where the masked rows of the last P tile wrap past 2^63, and with key words
    equal to 1, which Triton would specialize into constexprs on a GPU were they not excluded)."""
    p, k = 37, 21
    out = tp.project(torch.eye(p, dtype=dtype, device=DEVICE), k, seed, kind, row_offset)
    P = projection_matrix(p, k, seed, kind, row_offset, dtype=dtype, device=DEVICE, backend="triton")
    assert torch.equal(out, P)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("kind", ["rademacher", "gaussian"])
def test_linear_split_and_edges(tp, monkeypatch, bias, kind):
    """Weight/bias boundary inside a P tile, tile edges and split-K on the fused path."""
    _small_blocks(tp, monkeypatch)
    _force_split(tp, monkeypatch, target=8)
    a, s = _randn(13, 2, 5, seed=1), _randn(13, 2, 7, seed=2)  # p = 35 (+ 7): 1×2 tiles, 3 splits
    out = tp.project_linear(a, s, 20, 123, kind, 2**33 + 1, bias)
    assert torch.equal(out, tp.project_linear(a, s, 20, 123, kind, 2**33 + 1, bias))
    ref = _project_linear_reference(a.cpu(), s.cpu(), 20, 123, kind, 2**33 + 1, bias)
    assert _rel(out, ref) < TOL


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_linear_dtypes(tp, dtype):
    a, s = _randn(6, 2, 9, dtype=dtype, seed=4), _randn(6, 2, 4, dtype=dtype, seed=5)
    out = tp.project_linear(a, s, 24, 8, "gaussian", 0, True)
    assert out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    ref = _project_linear_reference(a.cpu(), s.cpu(), 24, 8, "gaussian", 0, True)
    assert _rel(out, ref) < (1e-12 if dtype == torch.float64 else TOL)


def test_degenerate_shapes(tp):
    assert torch.equal(tp.project(_randn(0, 5), 4, 1, "rademacher", 0), torch.zeros(0, 4, device=DEVICE))
    assert torch.equal(tp.project(_randn(3, 0), 4, 1, "rademacher", 0), torch.zeros(3, 4, device=DEVICE))
    # d_in = 0: only the bias rows remain; T = 0: the gradient is zero
    a, s = _randn(4, 2, 0), _randn(4, 2, 3, seed=1)
    out = tp.project_linear(a, s, 8, 5, "rademacher", 10, True)
    assert _rel(out, _project_linear_reference(a.cpu(), s.cpu(), 8, 5, "rademacher", 10, True)) < TOL
    assert torch.equal(tp.project_linear(_randn(4, 0, 3), _randn(4, 0, 2), 8, 5, "gaussian", 0, True),
                       torch.zeros(4, 8, device=DEVICE))


def test_public_ops_route_to_triton(tp):
    grads = _randn(5, 40)
    ref = _project_reference(grads.cpu().double(), 9, 1, "rademacher", 0)
    assert _rel(project(grads, 9, 1, backend="triton"), ref) < TOL
    a, s = _randn(5, 6, seed=1), _randn(5, 3, seed=2)
    ref = _project_linear_reference(a.cpu()[:, None], s.cpu()[:, None], 9, 1, "rademacher", 0, True)
    assert _rel(project_linear(a, s, 9, 1, backend="triton"), ref) < TOL


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", ["rademacher", "gaussian"])
def test_tf32_split_keeps_float32_accuracy(tp, monkeypatch, dtype, kind):
    """The TF32 tensor-core path (the default on sm_80+ GPUs; forced here, so the interpreter runs
    its split arithmetic): operands cut into TF32-exact parts, Rademacher P unscaled then scaled.
    Dropping x's low part alone would leave ~2^-11 relative error, so the bound can fail."""
    _small_blocks(tp, monkeypatch)
    monkeypatch.setattr(tp, "TF32_SPLIT", True)
    grads = _randn(37, 203, dtype=dtype, seed=5)
    out = project(grads, 70, 99, kind, 2**32 - 7, backend="triton")
    ref = _project_reference(grads.cpu().double(), 70, 99, kind, 2**32 - 7)
    assert out.dtype == torch.float32 and _rel(out, ref) < 2e-6
    a, s = _randn(9, 3, 17, dtype=dtype), _randn(9, 3, 6, dtype=dtype, seed=2)
    lin = project_linear(a, s, 70, 99, 5, kind=kind, backend="triton")
    assert _rel(lin, _project_linear_reference(a.cpu(), s.cpu(), 70, 99, kind, 5, True)) < 2e-6
