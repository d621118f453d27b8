"""Triton-specific checks of grad_dot / grad_dot_factored: tile edges with small blocks, Grad-Cos
zero rows inside later tiles, accumulation over layers (fixed order, bitwise reproducible),
dtypes and degenerate shapes. Runs in the triton pytest process (TRITON_INTERPRET=1 on CPU)."""
import pytest
import torch

from fimoda_kernels.ops.grad_dot import _factored_reference, _grad_dot_reference, grad_dot, grad_dot_factored

from helpers import TRITON_DEVICE, TRITON_TOL, randn, rel, triton_module

pytestmark = pytest.mark.triton

DEVICE, TOL = TRITON_DEVICE, TRITON_TOL


@pytest.fixture
def tg():
    return triton_module("grad_dot")


def _randn(*shape, dtype=torch.float32, seed=0):
    return randn(*shape, dtype=dtype, device=DEVICE, seed=seed, shift=0.05)


_rel = rel


def _small_blocks(tg, monkeypatch):
    """16×16×16 tiles everywhere, so small shapes cross many tile edges."""
    for name in ("_INTERPRET_CONFIG", "_GPU_CONFIG", "_GPU_CONFIG_LOW", "_GPU_CONFIG_FP64"):
        monkeypatch.setattr(tg, name, (16, 16, 16, 4))


def _factored_ref(A, S, B, R):
    return _factored_reference([(a.cpu()[:, None], s.cpu()[:, None]) for a, s in zip(A, S)],
                               [(b.cpu()[:, None], r.cpu()[:, None]) for b, r in zip(B, R)])


def _factors(n, m, widths, dtype=torch.float32, seed=0):
    A = [_randn(n, di, dtype=dtype, seed=seed + 4 * l) for l, (di, _) in enumerate(widths)]
    S = [_randn(n, do, dtype=dtype, seed=seed + 4 * l + 1) for l, (_, do) in enumerate(widths)]
    B = [_randn(m, di, dtype=dtype, seed=seed + 4 * l + 2) for l, (di, _) in enumerate(widths)]
    R = [_randn(m, do, dtype=dtype, seed=seed + 4 * l + 3) for l, (_, do) in enumerate(widths)]
    return A, S, B, R


def test_config(tg):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert tg._config(3, 200, 7, torch.float32, cpu) == (16, 128, 16, 4)  # clamped to [16, cap]
    assert tg._config(1000, 1000, 1000, torch.float32, cpu) == tg._INTERPRET_CONFIG
    assert tg._config(10**6, 10**6, 10**6, torch.float16, cuda) == tg._GPU_CONFIG_LOW
    assert tg._config(10**6, 10**6, 10**6, torch.float64, cuda) == tg._GPU_CONFIG_FP64
    assert tg._config(5, 5, 3, torch.float64, cuda)[2] == 4  # no tl.dot for float64: no 16 minimum
    assert tg._native(torch.float16, cpu) and not tg._native(torch.bfloat16, cpu)
    assert tg._native(torch.bfloat16, cuda) and not tg._native(torch.float32, cuda)


def test_float64_tiles_fit_one_triton_tensor(tg):
    """float64 (no tl.dot) multiplies a [BLOCK_N, BLOCK_D, BLOCK_M] broadcast product, which Triton caps at
    2^20 elements: the interpreter's large tiles are shrunk for it (65 per side raised before)."""
    from fimoda_kernels.ops.ekfac import kfac_factors

    cpu = torch.device("cpu")
    bn, bm, bd, _ = tg._config(1000, 1000, 1000, torch.float64, cpu)
    assert bn * bm * bd <= 2**20
    x, y = _randn(65, 65, dtype=torch.float64), _randn(66, 65, dtype=torch.float64, seed=1)
    assert _rel(grad_dot(x, y, backend="triton"), _grad_dot_reference(x, y)) < 1e-13
    pairs = [[(_randn(65, 65, dtype=torch.float64, seed=2), _randn(65, 3, dtype=torch.float64, seed=3))]]
    got = kfac_factors(pairs, dtype=torch.float64, backend="triton")
    want = kfac_factors(pairs, dtype=torch.float64, backend="torch")
    assert all(_rel(g, w) < 1e-13 for gs, ws in zip(got, want) for g, w in zip(gs, ws))


@pytest.mark.parametrize("n,m,d", [(16, 16, 16), (17, 33, 40), (1, 47, 17), (33, 5, 50)])
@pytest.mark.parametrize("normalize", [False, True])
def test_tile_edges(tg, monkeypatch, n, m, d, normalize):
    _small_blocks(tg, monkeypatch)
    tr, te = _randn(n, d, seed=n), _randn(m, d, seed=m + 100)
    out = tg.grad_dot(tr, te, normalize)
    assert out.shape == (n, m) and out.dtype == torch.float32
    assert _rel(out, _grad_dot_reference(tr.cpu(), te.cpu(), normalize)) < TOL


def test_zero_rows_in_later_tiles(tg, monkeypatch):
    """Zero rows past the first tile on both sides, and a zero-width d, score 0 (never NaN)."""
    _small_blocks(tg, monkeypatch)
    tr, te = _randn(40, 37, seed=1), _randn(20, 37, seed=2)
    tr[[0, 35]] = 0
    te[18] = 0
    out = tg.grad_dot(tr, te, True).cpu()
    assert torch.isfinite(out).all()
    assert torch.all(out[[0, 35]] == 0) and torch.all(out[:, 18] == 0)
    assert _rel(out, _grad_dot_reference(tr.cpu(), te.cpu(), True)) < TOL
    self_cos = tg.grad_dot(tr, tr, True).cpu().diagonal()
    keep = torch.ones(40, dtype=torch.bool)
    keep[[0, 35]] = False
    assert torch.allclose(self_cos[keep], torch.ones(38), atol=1e-6) and torch.all(self_cos[~keep] == 0)
    assert torch.equal(tg.grad_dot(_randn(3, 0), _randn(2, 0), True), torch.zeros(3, 2, device=DEVICE))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("normalize", [False, True])
def test_dtypes(tg, monkeypatch, dtype, normalize):
    _small_blocks(tg, monkeypatch)
    tr, te = _randn(21, 45, dtype=dtype, seed=3), _randn(18, 45, dtype=dtype, seed=4)
    out = tg.grad_dot(tr, te, normalize)
    assert out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    tol = 1e-12 if dtype == torch.float64 else TOL  # float16/bfloat16 products are exact in float32
    assert _rel(out, _grad_dot_reference(tr.cpu(), te.cpu(), normalize)) < tol


def test_degenerate_shapes(tg):
    assert torch.equal(tg.grad_dot(_randn(0, 5), _randn(3, 5), False), torch.zeros(0, 3, device=DEVICE))
    assert torch.equal(tg.grad_dot(_randn(4, 5), _randn(0, 5), True), torch.zeros(4, 0, device=DEVICE))
    assert torch.equal(tg.grad_dot(_randn(2, 0, dtype=torch.float64), _randn(3, 0, dtype=torch.float64), False),
                       torch.zeros(2, 3, dtype=torch.float64, device=DEVICE))
    A, S, B, R = _factors(0, 3, [(4, 2)])
    assert torch.equal(tg.grad_dot_factored(A, S, B, R), torch.zeros(0, 3, device=DEVICE))


@pytest.mark.parametrize("widths", [[(9, 4)], [(40, 17), (3, 1), (33, 50)]])
def test_factored_tile_edges(tg, monkeypatch, widths):
    _small_blocks(tg, monkeypatch)
    A, S, B, R = _factors(37, 19, widths)
    out = tg.grad_dot_factored(A, S, B, R)
    assert out.shape == (37, 19) and out.dtype == torch.float32
    assert _rel(out, _factored_ref(A, S, B, R)) < TOL


def test_factored_accumulates_layers(tg, monkeypatch):
    """The layer launches add up to the sum of single-layer results, bitwise reproducibly;
    zero-width layers add nothing, also when they come first."""
    _small_blocks(tg, monkeypatch)
    A, S, B, R = _factors(20, 17, [(5, 3), (18, 7), (2, 33)], seed=7)
    out = tg.grad_dot_factored(A, S, B, R)
    assert torch.equal(out, tg.grad_dot_factored(A, S, B, R))
    parts = [tg.grad_dot_factored([a], [s], [b], [r]) for a, s, b, r in zip(A, S, B, R)]
    summed = parts[0] + parts[1] + parts[2]
    if DEVICE == "cuda":  # compiled, the kernel may fuse product and accumulation into one FMA
        assert _rel(out, summed) < 1e-6
    else:  # the interpreter: the same fp32 additions in the same order
        assert torch.equal(out, summed)
    assert _rel(out, _factored_ref(A, S, B, R)) < TOL
    zA, zS, zB, zR = _factors(20, 17, [(0, 4), (6, 0)], seed=3)
    assert torch.equal(tg.grad_dot_factored(zA + A, zS + S, zB + B, zR + R), out)
    assert torch.equal(tg.grad_dot_factored(zA, zS, zB, zR), torch.zeros(20, 17, device=DEVICE))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_factored_dtypes(tg, dtype):
    A, S, B, R = _factors(13, 6, [(9, 4), (17, 2)], dtype=dtype, seed=11)
    out = tg.grad_dot_factored(A, S, B, R)
    assert out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert _rel(out, _factored_ref(A, S, B, R)) < (1e-12 if dtype == torch.float64 else TOL)


def test_public_ops_route_to_triton(tg):
    tr, te = _randn(9, 30, seed=5), _randn(4, 30, seed=6)
    assert _rel(grad_dot(tr, te, True, backend="triton"), _grad_dot_reference(tr.cpu(), te.cpu(), True)) < TOL
    A, S, B, R = _factors(9, 4, [(6, 3), (4, 2)], seed=2)
    tr_l, te_l = list(zip(A, S)), list(zip(B, R))
    ref = _factored_ref(A, S, B, R)
    assert _rel(grad_dot_factored(tr_l, te_l, backend="triton"), ref) < TOL
