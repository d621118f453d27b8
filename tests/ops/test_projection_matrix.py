import math

import pytest
import torch
from hypothesis import given, settings, strategies as st
from scipy import stats

import fimoda_kernels.ops.projection_matrix as pm
from fimoda_kernels import philox4x32, projection_matrix
from fimoda_kernels.ops.projection_matrix import _projection_matrix_reference as reference


def _rel(out, ref):
    return float((out.double().cpu() - ref).norm() / ref.norm())


@pytest.mark.parametrize("p,k", [(1, 1), (37, 13), (129, 4), (5, 515), (64, 2)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_rademacher_bit_identical(backend_device, p, k, dtype):
    backend, device = backend_device
    seed, offset = 2**40 + 17, 12345
    out = torch.full((1,), float("nan"))  # poison: the op must produce every entry
    out = projection_matrix(p, k, seed, "rademacher", offset, dtype=dtype, device=device, backend=backend)
    want = reference(p, k, seed, "rademacher", offset, dtype=dtype)
    assert out.shape == (p, k) and out.dtype == dtype and out.device.type == device
    assert torch.equal(out.cpu(), want)
    assert torch.equal(want.abs(), torch.full_like(want, 1 / math.sqrt(k)))


@pytest.mark.parametrize("p,k", [(1, 1), (37, 13), (129, 4), (5, 515)])
def test_gaussian_close_to_float64(backend_device, p, k):
    backend, device = backend_device
    seed, offset = 987654321, 2**33 + 1
    want = reference(p, k, seed, "gaussian", offset, dtype=torch.float64)
    out32 = projection_matrix(p, k, seed, "gaussian", offset, device=device, backend=backend)
    assert _rel(out32, want) < 1e-6
    out64 = projection_matrix(p, k, seed, "gaussian", offset, dtype=torch.float64, device=device, backend=backend)
    assert _rel(out64, want) < 1e-13


@pytest.mark.skipif(pm._C is None, reason="native module not built")
@pytest.mark.parametrize("kind", ["rademacher", "gaussian"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("col_begin,cols", [(0, 300), (1, 7), (3, 130), (127, 129), (128, 128), (299, 1), (256, 44)])
def test_cpu_column_ranges(kind, dtype, col_begin, cols):
    """The cpu kernel fills any column range of P: partial Philox groups and blocks at both ends."""
    k, seed, offset = 300, 2**35 + 3, 2**32 - 2
    out = torch.full((9, cols), float("nan"), dtype=dtype)
    pm._projection_cpu(out, seed, kind, offset, col_begin=col_begin, k=k)
    want = reference(9, k, seed, kind, offset, dtype=torch.float64)[:, col_begin:col_begin + cols]
    if kind == "rademacher":
        assert torch.equal(out, want.to(dtype))
    else:
        assert _rel(out, want) < (1e-6 if dtype == torch.float32 else 1e-13)


@pytest.mark.parametrize("kind", ["rademacher", "gaussian"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_outputs_staged_in_blocks(backend_device, kind, dtype, monkeypatch):
    backend, device = backend_device
    monkeypatch.setattr(pm, "_CAST_CHUNK_BYTES", 4 * 7 * 10)  # 10-row blocks: several per call
    out = projection_matrix(33, 7, 5, kind, 3, dtype=dtype, device=device, backend=backend)
    want = reference(33, 7, 5, kind, 3, dtype=torch.float64)
    assert out.dtype == dtype
    assert torch.allclose(out.cpu().double(), want, rtol=1e-2, atol=1e-3)
    if kind == "rademacher":
        assert torch.equal(out.cpu(), want.to(dtype))


@pytest.mark.parametrize("kind", ["rademacher", "gaussian"])
def test_rows_past_2_pow_32(backend_device, kind):
    """64-bit parameter indices: the hi word enters the counter; entries match Philox directly."""
    backend, device = backend_device
    seed, k, offset = 0xDEADBEEF12345678, 9, 2**32 - 3
    out = projection_matrix(7, k, seed, kind, offset, dtype=torch.float64, device=device, backend=backend).cpu()
    key = torch.tensor([seed & 0xFFFFFFFF, seed >> 32])
    for r in range(7):
        i = offset + r
        for j in range(k):
            if kind == "rademacher":
                w = philox4x32(torch.tensor([j >> 2, i & 0xFFFFFFFF, i >> 32, 0]), key)[j & 3].item()
                want = (1 - 2 * (w & 1)) / math.sqrt(k)
            else:
                w = philox4x32(torch.tensor([j >> 1, i & 0xFFFFFFFF, i >> 32, 1]), key).tolist()
                u1, u2 = (w[2 * (j & 1)] + 1) * 2.0**-32, w[2 * (j & 1) + 1] * 2.0**-32
                want = math.sqrt(-2 * math.log(u1)) * math.cos(2 * math.pi * u2) / math.sqrt(k)
            assert out[r, j].item() == pytest.approx(want, rel=1e-12, abs=1e-15)
    # the rows at index i and i + 2^32 must differ (the hi word is not dropped)
    low = projection_matrix(7, k, seed, kind, offset - 2**32 + 2**33, dtype=torch.float64, backend=backend,
                            device=device).cpu()
    assert not torch.equal(out, low)


def test_row_blocks_compose(backend_device):
    """Any row block equals the same rows of a larger matrix (what per-layer offsets rely on)."""
    backend, device = backend_device
    full = projection_matrix(50, 11, 3, "gaussian", 1000, device=device, backend=backend)
    part = projection_matrix(17, 11, 3, "gaussian", 1020, device=device, backend=backend)
    assert torch.equal(full[20:37], part)


def test_seeds_differ(backend_device):
    backend, device = backend_device
    a = projection_matrix(16, 32, 1, device=device, backend=backend)
    for other in (2, 1 + 2**32):  # low and high key words both matter
        assert (a != projection_matrix(16, 32, other, device=device, backend=backend)).float().mean() > 0.3


@settings(max_examples=30, deadline=None)
@given(p=st.integers(0, 40), k=st.integers(1, 40), seed=st.integers(0, 2**64 - 1),
       offset=st.integers(0, 2**45), kind=st.sampled_from(["rademacher", "gaussian"]))
def test_cpu_matches_reference_hypothesis(p, k, seed, offset, kind):
    want = reference(p, k, seed, kind, offset, dtype=torch.float64)
    out = projection_matrix(p, k, seed, kind, offset, dtype=torch.float64, backend="cpu")
    assert torch.allclose(out, want, rtol=1e-13, atol=1e-15)


@pytest.mark.triton
@settings(max_examples=8, deadline=None)
@given(p=st.integers(1, 20), k=st.integers(1, 300), seed=st.integers(0, 2**64 - 1),
       kind=st.sampled_from(["rademacher", "gaussian"]))
def test_triton_matches_reference_hypothesis(p, k, seed, kind):
    from fimoda_kernels._dispatch import backend_unavailable_reasons

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if backend_unavailable_reasons("triton", device):
        pytest.skip("triton unavailable")
    want = reference(p, k, seed, kind, 7, dtype=torch.float64)
    out = projection_matrix(p, k, seed, kind, 7, dtype=torch.float64, device=device, backend="triton")
    assert torch.allclose(out.cpu(), want, rtol=1e-13, atol=1e-15)


def test_distribution():
    """Entries are ±1/√k (Rademacher, balanced) or N(0, 1/k) (Gaussian, KS test)."""
    k = 256
    r = projection_matrix(400, k, 11, "rademacher").flatten() * math.sqrt(k)
    assert abs(r.mean().item()) < 0.01  # 102400 signs: sd of the mean 0.003
    g = projection_matrix(400, k, 11, "gaussian", dtype=torch.float64).flatten() * math.sqrt(k)
    assert stats.kstest(g.numpy(), "norm").pvalue > 1e-3
    assert abs(g.var().item() - 1) < 0.02


def test_gaussian_float32_cpu_tight():
    """CPU float32 Gaussian entries (vectorized Box–Muller of csrc/cpu/fast_math.h) are within a few
    float32 ulps of the float64 ones, also as u1 -> 1, where float(w) + 1 rounds to 1 (~100 of these
    2^21 entries have -2 ln u1 < 1e-4)."""
    p, k, seed, offset = 4096, 512, 0xC0FFEE, 2**36 + 3
    want = projection_matrix(p, k, seed, "gaussian", offset, dtype=torch.float64, backend="cpu") * math.sqrt(k)
    sample = reference(16, k, seed, "gaussian", offset + 100, dtype=torch.float64) * math.sqrt(k)
    assert torch.allclose(want[100:116], sample, rtol=1e-13, atol=1e-15)  # the float64 path is the reference
    got = projection_matrix(p, k, seed, "gaussian", offset, backend="cpu").double() * math.sqrt(k)
    err = (got - want).abs()
    # measured 2.6e-7 and 5.6e-8; float(w) + 1 with logf/cosf (gaussian_entry<float>): 1.5e-5 and 1.7e-7
    assert float((err / want.abs().clamp(min=1)).max()) < 5e-7
    assert float(err.norm() / want.norm()) < 1e-7


def test_gaussian_float32_entries_tight(backend_device):
    """Every backend's float32 Gaussian entry keeps float32 relative accuracy, also near the zeros of
    cos(2π u2) (a rounded u2 costs up to 5e-4 relative there) and where u1 -> 1."""
    backend, device = backend_device
    p, k, seed, offset = 96, 130, 0xBEEF, 2**32 - 40
    want = reference(p, k, seed, "gaussian", offset, dtype=torch.float64)
    got = projection_matrix(p, k, seed, "gaussian", offset, device=device, backend=backend).double().cpu()
    assert float(((got - want).abs() / want.abs()).max()) < 5e-7


@pytest.mark.triton
def test_triton_gaussian_edge_words():
    """The Triton float32 Box–Muller on the edges of its integer reductions: quadrant boundaries of w_b,
    and w_a at 0, at the near-one switch (2^32 − 1 − w_a = 0x4B000000) and up to 2^32 − 1 (u1 = 1)."""
    import triton
    import triton.language as tl

    from helpers import TRITON_DEVICE, triton_module

    global _triton_gaussian  # a jitted kernel resolves the functions it calls among its module's globals
    _triton_gaussian = triton_module("projection_matrix")._gaussian

    @triton.jit
    def kernel(wa_ptr, wb_ptr, scale_ptr, out_ptr, N: tl.constexpr):
        i = tl.arange(0, N)
        wa, wb = tl.load(wa_ptr + i).to(tl.uint32), tl.load(wb_ptr + i).to(tl.uint32)
        tl.store(out_ptr + i, _triton_gaussian(wa, wb, tl.load(scale_ptr), tl.float32))

    was = [0, 1, 2**31 - 1, 2**31, 0xB4FFFFFE, 0xB4FFFFFF, 0xB5000000, 0xFFFFFF00, 0xFFFFFFFD, 0xFFFFFFFE,
           0xFFFFFFFF, 0x9E3779B9]
    wbs = [0, 1, 2**29 - 1, 2**29, 2**30 - 1, 2**30, 2**30 + 1, 0x60000000, 2**31 - 1, 2**31, 0xBFFFFFFF,
           0xC0000000, 0xC0000001, 0xE0000000, 0xFFFFFFFF, 0x3C6EF372]
    pairs = [(a, b) for a in was for b in wbs]
    pairs += [(0x7F4A7C15, b) for b in range(2**30 - 64, 2**30 + 64)]  # cos's zero at a quarter turn
    n = triton.next_power_of_2(len(pairs))
    pairs += [(0, 0)] * (n - len(pairs))
    wa = torch.tensor([a for a, _ in pairs], dtype=torch.int64, device=TRITON_DEVICE)
    wb = torch.tensor([b for _, b in pairs], dtype=torch.int64, device=TRITON_DEVICE)
    out = torch.empty(n, dtype=torch.float32, device=TRITON_DEVICE)
    kernel[(1,)](wa, wb, torch.ones(1, device=TRITON_DEVICE), out, N=n)
    want = torch.tensor([math.sqrt(-2 * math.log((a + 1) / 2**32)) * math.cos(2 * math.pi * b / 2**32)
                         for a, b in pairs], dtype=torch.float64)
    err = (out.double().cpu() - want).abs()
    # relative, with a floor for cos's exact zeros (float64's cos(π/2) is 6e-17, ours exactly 0)
    assert bool((err <= 5e-7 * want.abs() + 1e-12).all())
    assert float(out[was.index(0xFFFFFFFF) * len(wbs)]) == 0.0  # u1 = 1


def test_gaussian_float32_distribution():
    """2^21 float32 entries: N(0, 1) by KS, moments, two-sided tail counts, the Box–Muller bound."""
    k = 1024
    g = (projection_matrix(2048, k, 12345, "gaussian", 7, backend="cpu") * math.sqrt(k)).double().flatten()
    n = g.numel()
    assert stats.kstest(g.numpy(), "norm").pvalue > 1e-3
    assert abs(g.mean().item()) < 5 / math.sqrt(n)
    assert abs(g.var().item() - 1) < 5 * math.sqrt(2 / n)
    assert abs((g**4).mean().item() - 3) < 5 * math.sqrt(96 / n)
    for t in (2.0, 3.0, 4.0):
        prob = 2 * stats.norm.sf(t)
        assert abs((g.abs() > t).sum().item() - n * prob) < 5 * math.sqrt(n * prob) + 1
    assert g.abs().max().item() <= math.sqrt(-2 * math.log(2.0**-32)) * (1 + 1e-6)
    # sign balance, and the mass near 0 (small cos(2π u2) or u1 near 1)
    assert abs((g > 0).double().mean().item() - 0.5) < 5 * 0.5 / math.sqrt(n)
    small = (g.abs() < 0.3).double().mean().item()
    assert abs(small - (1 - 2 * stats.norm.sf(0.3))) < 5 * 0.5 / math.sqrt(n)


def test_jl_inner_products_preserved():
    """E[PᵀP] = I: projected inner products are unbiased with O(1/√k) spread."""
    p, k = 300, 4096
    x = torch.randn(2, p, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    for kind in ("rademacher", "gaussian"):
        P = projection_matrix(p, k, 21, kind, dtype=torch.float64)
        y = x @ P
        assert abs((y[0] @ y[1] - x[0] @ x[1]).item()) < 5 * x[0].norm() * x[1].norm() / math.sqrt(k)
        assert abs((y[0].norm() / x[0].norm()).item() - 1) < 5 / math.sqrt(k)


@pytest.mark.parametrize("kwargs,err,match", [
    (dict(p=10, k=0, seed=0), ValueError, "k: expected an integer >= 1"),
    (dict(p=-1, k=4, seed=0), ValueError, "p: expected an integer >= 0"),
    (dict(p=3, k=4, seed=-1), ValueError, "seed: expected an integer >= 0"),
    (dict(p=3, k=4, seed=2**64), ValueError, "seed: expected an integer <="),
    (dict(p=3, k=4, seed=1.5), TypeError, "seed: expected an integer, got float"),
    (dict(p=3, k=4, seed=True), TypeError, "seed: expected an integer, got bool"),
    (dict(p=3.0, k=4, seed=0), TypeError, "p: expected an integer"),
    (dict(p=3, k=4, seed=0, kind="sparse"), ValueError, "kind: expected one of"),
    (dict(p=3, k=4, seed=0, dtype=torch.int32), TypeError, "dtype: expected one of"),
    (dict(p=3, k=4, seed=0, row_offset=2**63 - 2), ValueError, r"row_offset: expected row_offset \+ p <= 2\^63"),
    (dict(p=3, k=4, seed=0, backend="fast"), ValueError, "backend: expected one of"),
])
def test_bad_input(kwargs, err, match):
    with pytest.raises(err, match=match):
        projection_matrix(**kwargs)


def test_numpy_and_tensor_integers_accepted():
    import numpy as np

    a = projection_matrix(np.int64(5), torch.tensor(4), np.uint64(9))
    assert torch.equal(a, projection_matrix(5, 4, 9))


@pytest.mark.parametrize("isa", ["scalar", "avx2"])
def test_cpu_simd_paths_agree(isa):
    """The CPU kernel's lower instruction-set paths (forced by FIMODA_SIMD, read once per process)
    produce the same matrices as the reference."""
    import os
    import subprocess
    import sys

    code = ("import torch, fimoda_kernels as fk\n"
            "from fimoda_kernels._ext import _C\n"
            "from fimoda_kernels.ops.projection_matrix import _projection_matrix_reference as ref\n"
            "for kind in ('rademacher', 'gaussian'):\n"
            "    for p, k in ((3, 1), (37, 129), (5, 300)):\n"
            "        a = fk.projection_matrix(p, k, 2**63 + 5, kind, 2**32 - 2, dtype=torch.float64, backend='cpu')\n"
            "        assert torch.allclose(a, ref(p, k, 2**63 + 5, kind, 2**32 - 2, torch.float64), rtol=1e-13, atol=1e-15)\n"
            "for p, k in ((3, 1), (37, 129), (5, 300), (2, 4173), (9, 64)):\n"  # float32 Rademacher: exact bits
            "    a = fk.projection_matrix(p, k, 77, 'rademacher', 2**32 - 2, backend='cpu')\n"
            "    assert torch.equal(a, ref(p, k, 77, 'rademacher', 2**32 - 2, torch.float32)), (p, k)\n"
            "print(_C.cpu_simd())\n")
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "FIMODA_SIMD": isa},
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() in (isa, "scalar")  # a CPU without AVX2 runs the scalar path


@pytest.mark.parametrize("isa", ["scalar", "avx2"])
def test_cpu_simd_paths_bit_identical_float32(isa, tmp_path):
    """Float32 Gaussian entries are the same bits on every CPU instruction-set path (no FMA
    contraction in the Box–Muller, correctly rounded sqrt), so results do not depend on the machine."""
    import os
    import subprocess
    import sys

    args = (37, 515, 2**63 + 5, "gaussian", 2**32 - 2)
    path = tmp_path / "p.pt"
    code = ("import sys, torch, fimoda_kernels as fk\n"
            f"torch.save(fk.projection_matrix(*{args!r}, backend='cpu'), sys.argv[1])\n")
    out = subprocess.run([sys.executable, "-c", code, str(path)], env={**os.environ, "FIMODA_SIMD": isa},
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert torch.equal(torch.load(path), projection_matrix(*args, backend="cpu"))
