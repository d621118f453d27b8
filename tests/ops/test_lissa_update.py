"""The fused LiSSA update op vs its float64 reference on every backend that can run here."""
import pytest
import torch
from helpers import randn, rel

from fimoda_kernels._ext import _C
from fimoda_kernels.ops.lissa_update import _lissa_update_reference, lissa_update

SHAPES = [(1, 1), (3, 17), (5, 8193), (2, 20001), (77, 300)]


def _inputs(r, p, dtype, device, seed=0):
    return (randn(r, p, dtype=dtype, device=device, seed=seed), randn(r, p, dtype=dtype, device=device, seed=seed + 1),
            randn(r, p, dtype=dtype, device=device, seed=seed + 2))


@pytest.mark.parametrize("r,p", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_reference(backend_device, r, p, dtype):
    backend, device = backend_device
    h, v, mh = _inputs(r, p, dtype, device, seed=r + p)
    ref, ref_sq = _lissa_update_reference(h.cpu(), v.cpu(), mh.cpu(), 37.5, 0.013)
    out = torch.full_like(h, float("nan"))  # poisoned: every element must be written
    got, sq = lissa_update(h, v, mh, 37.5, 0.013, out=out, backend=backend)
    assert got is out and sq.shape == (r,) and sq.dtype == dtype and got.device.type == device
    tol = 1e-12 if dtype == torch.float64 else 1e-6
    assert rel(got, ref) < tol
    assert rel(sq, ref_sq) < (1e-12 if dtype == torch.float64 else 1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_in_place_and_fresh_output(backend_device, dtype):
    backend, device = backend_device
    h, v, mh = _inputs(4, 1000, dtype, device, seed=7)
    ref, ref_sq = _lissa_update_reference(h.cpu(), v.cpu(), mh.cpu(), 10.0, 0.0)
    fresh, sq_fresh = lissa_update(h, v, mh, 10.0, 0.0, backend=backend)
    same, sq_same = lissa_update(h, v, mh, 10.0, 0.0, out=h, backend=backend)  # h ← update(h)
    assert same is h and fresh is not h
    tol = 1e-12 if dtype == torch.float64 else 1e-6
    assert rel(fresh, ref) < tol and rel(same, ref) < tol and torch.equal(sq_same, sq_fresh)


def test_non_finite_passes_through(backend_device):
    """The op reports, the solver decides: an Inf in mh gives an infinite row norm, the others stay finite."""
    backend, device = backend_device
    h, v, mh = _inputs(3, 50, torch.float32, device, seed=3)
    mh[1, 7] = float("inf")
    _, sq = lissa_update(h, v, mh, 20.0, 0.1, backend=backend)
    assert torch.isfinite(sq[[0, 2]]).all() and not torch.isfinite(sq[1])


def test_non_contiguous_inputs():
    h, v, mh = (t.T for t in _inputs(40, 6, torch.float64, "cpu", seed=9))  # [6, 40] views
    ref, ref_sq = _lissa_update_reference(h, v, mh, 5.0, 0.5)
    got, sq = lissa_update(h, v, mh, 5.0, 0.5)
    assert rel(got, ref) < 1e-14 and rel(sq, ref_sq) < 1e-14


def test_validation():
    h, v, mh = _inputs(2, 5, torch.float32, "cpu")
    with pytest.raises(ValueError, match="scale"):
        lissa_update(h, v, mh, 0.0, 0.1)
    with pytest.raises(ValueError, match="damping"):
        lissa_update(h, v, mh, 1.0, -0.1)
    with pytest.raises(ValueError, match="mh: expected shape"):
        lissa_update(h, v, mh[:, :4], 1.0, 0.1)
    with pytest.raises(TypeError, match="v: expected dtype"):
        lissa_update(h, v.double(), mh, 1.0, 0.1)
    with pytest.raises(TypeError, match="h: expected dtype"):
        lissa_update(h.half(), v.half(), mh.half(), 1.0, 0.1)
    with pytest.raises(ValueError, match="out: expected a contiguous"):
        lissa_update(h, v, mh, 1.0, 0.1, out=torch.empty(5, 2).T)
    with pytest.raises(ValueError, match="backend='cuda' cannot run lissa_update on cpu"):
        lissa_update(h, v, mh, 1.0, 0.1, backend="cuda")


@pytest.mark.skipif(_C is None or not getattr(_C, "has_cuda", False) or torch.cuda.is_available(),
                    reason="needs a CUDA build of _C on a machine without a usable GPU")
def test_cuda_entry_raises_without_device():
    with pytest.raises(RuntimeError, match="no CUDA device available"):
        #                    h  v  mh out sq part dtype r  p  scale damping stream
        _C.lissa_update_cuda(0, 0, 0, 0, 0, 0, 0, 2, 5, 10.0, 0.1, 0)


def test_out_overlapping_inputs_is_refused():
    """out may be h itself (in place) but not overlap h shifted, v or mh."""
    buf = randn(5, 7, dtype=torch.float64)
    h, v, mh = buf[:4], randn(4, 7, dtype=torch.float64), randn(4, 7, dtype=torch.float64)
    with pytest.raises(ValueError, match="out: expected h itself .* partial overlap"):
        lissa_update(h, v, mh, 10.0, 0.1, out=buf[1:])
    with pytest.raises(ValueError, match="out: expected memory separate from v's"):
        lissa_update(h, v, mh, 10.0, 0.1, out=v)
    lissa_update(h, v, mh, 10.0, 0.1, out=h)  # in place stays allowed


@pytest.mark.parametrize("scale", [1e-39, 1e44])
def test_scale_whose_reciprocal_is_not_a_normal_float_is_refused(scale):
    # the kernels multiply by 1/scale in h's dtype: 1e44 would round it to a subnormal (2% off) and
    # 1e46 to zero, while the float64 reference stays exact
    h = randn(2, 3)
    with pytest.raises(ValueError, match="scale: expected a value whose reciprocal is a normal torch.float32 number"):
        lissa_update(h, randn(2, 3), torch.zeros(2, 3), scale, 0.0)
    lissa_update(h.double(), randn(2, 3).double(), torch.zeros(2, 3, dtype=torch.float64), scale, 0.0)  # fine in float64
