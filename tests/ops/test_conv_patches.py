"""conv_patches: the native cpu pass equals the reference (unfold + transpose + bias column) exactly."""
import pytest
import torch
from hypothesis import assume, given, settings, strategies as st

from fimoda_kernels._ext import _C
from fimoda_kernels.ops.conv_patches import _conv_patches_reference, conv_patches, output_size
from helpers import randn

BACKENDS = [pytest.param("cpu", marks=pytest.mark.skipif(_C is None, reason="native module not built")), "torch"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("k,s,p,d,bias", [(3, 1, 1, 1, True), ((2, 3), (2, 1), (0, 2), (1, 2), False),
                                          (1, 1, 0, 1, True), (3, 2, 1, 2, True), ((1, 4), 3, (2, 0), 1, True)])
def test_matches_reference(backend, dtype, k, s, p, d, bias):
    x = randn(3, 5, 13, 10, dtype=dtype, seed=7)
    out = conv_patches(x, k, s, p, d, bias, backend=backend)
    ref = _conv_patches_reference(x, *(v if isinstance(v, tuple) else (v, v) for v in (k, s, p, d)), bias)
    assert out.is_contiguous() and out.dtype == dtype
    assert torch.equal(out, ref)  # copies only: bitwise


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 3), c=st.integers(1, 4), h=st.integers(1, 9), w=st.integers(1, 9), kh=st.integers(1, 4),
       kw=st.integers(1, 4), sh=st.integers(1, 3), sw=st.integers(1, 3), ph=st.integers(0, 2), pw=st.integers(0, 2),
       dh=st.integers(1, 2), dw=st.integers(1, 2), bias=st.booleans(), channels_last=st.booleans())
def test_cpu_hypothesis(n, c, h, w, kh, kw, sh, sw, ph, pw, dh, dw, bias, channels_last):
    if _C is None:
        pytest.skip("native module not built")
    assume(output_size(h, kh, sh, ph, dh) >= 1 and output_size(w, kw, sw, pw, dw) >= 1)
    x = randn(n, c, h, w, seed=n * 100 + c)
    if channels_last:  # the capture's CPU layout (contiguous channel reads in the kernel)
        x = x.contiguous(memory_format=torch.channels_last)
    args = ((kh, kw), (sh, sw), (ph, pw), (dh, dw))
    assert torch.equal(conv_patches(x, *args, bias, backend="cpu"), _conv_patches_reference(x, *args, bias))


@pytest.mark.parametrize("backend", BACKENDS)
def test_large_kernel(backend):
    """Kernels of more than 121 taps take the cpu kernel's per-element path."""
    x = randn(2, 3, 14, 13, seed=5).contiguous(memory_format=torch.channels_last)
    out = conv_patches(x, (12, 11), 1, (1, 2), 1, True, backend=backend)
    assert out.shape == (2, 5 * 7, 3 * 12 * 11 + 1)
    assert torch.equal(out, _conv_patches_reference(x, (12, 11), (1, 1), (1, 2), (1, 1), True))


@pytest.mark.parametrize("layout", ["transposed", "channels_last", "sliced"])
def test_strided_input(layout):
    """The cpu kernel reads x through its strides (channels_last and views need no copy)."""
    x = randn(2, 5, 9, 7, seed=3)
    x = {"transposed": x.transpose(2, 3), "channels_last": x.contiguous(memory_format=torch.channels_last),
         "sliced": x[:, 1:4, ::2]}[layout]
    want = _conv_patches_reference(x, (3, 2), (1, 2), (1, 1), (1, 1), True)
    assert torch.equal(conv_patches(x, (3, 2), (1, 2), 1, backend="cpu" if _C is not None else "torch"), want)


@pytest.mark.parametrize("call,err,match", [
    (lambda x: conv_patches(x[0], 3), ValueError, "x: expected a 4-D tensor"),
    (lambda x: conv_patches(x.long(), 3), TypeError, "x: expected dtype"),
    (lambda x: conv_patches(x, 0), ValueError, "kernel_size"),
    (lambda x: conv_patches(x, 3, padding=-1), ValueError, "padding"),
    (lambda x: conv_patches(x, 2.5), TypeError, "kernel_size: expected an int or a pair"),
    (lambda x: conv_patches(x, 20), ValueError, "no output position"),
    (lambda x: conv_patches(x.half(), 3, backend="cpu"), ValueError, "float32 or float64"),
    (lambda x: conv_patches(x, 3, bias="no"), TypeError, "bias: expected a bool, got str"),
])
def test_bad_input(call, err, match):
    if _C is None and "float32 or float64" in match:
        pytest.skip("native module not built")
    with pytest.raises(err, match=match):
        call(randn(2, 3, 8, 8))


def test_no_channels():
    """C = 0: no patch entries but the bias column, on every CPU backend (unfold refuses empty input)."""
    x = torch.randn(2, 0, 5, 5)
    for backend in ("torch",) + (("cpu",) if _C is not None else ()):
        out = conv_patches(x, 3, padding=1, backend=backend)
        assert out.shape == (2, 25, 1) and bool((out == 1).all())
