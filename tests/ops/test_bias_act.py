"""bias_act / bias_act_backward: the native cpu passes against the float64 reference (and the torch
backend), every activation, odd shapes, per-model determinism of the bias sums, bad inputs."""
import pytest
import torch
from hypothesis import given, settings, strategies as st

from fimoda_kernels._ext import _C
from fimoda_kernels.ops.bias_act import (FORWARD_ACTS, _bias_act_backward_reference, _bias_act_reference, bias_act,
                                         bias_act_backward)
from helpers import randn

BACKENDS = [pytest.param("cpu", marks=pytest.mark.skipif(_C is None, reason="native module not built")), "torch"]
BACKWARD_ACTS = ["identity", "relu", "leaky_relu", "tanh", "sigmoid"]
# (M, R, C): one model, odd sizes, more columns than a backward column block (256), no rows
SHAPES = [(3, 5, 7), (1, 17, 130), (4, 9, 300), (2, 0, 6), (64, 3, 1)]
TOL = {torch.float32: 2e-6, torch.float64: 1e-14}


def _activations(act, M, R, C, dtype, seed):
    """h = act(z) of fresh z, with exact zeros where relu clips (the derivative's edge)."""
    z = randn(M, R, C, dtype=torch.float64, seed=seed, shift=0.0)
    h = {"identity": z, "relu": z.clamp(min=0), "leaky_relu": torch.where(z > 0, z, 0.2 * z),
         "tanh": z.tanh(), "sigmoid": z.sigmoid()}[act]
    return h.to(dtype)


def _grid(acts, with_bias=True):
    """The reference comparisons' grid: backend × dtype × act × shape (× with_bias)."""
    marks = [pytest.mark.parametrize("backend", BACKENDS), pytest.mark.parametrize("dtype", list(TOL)),
             pytest.mark.parametrize("act", acts), pytest.mark.parametrize("shape", SHAPES)]
    if with_bias:
        marks.append(pytest.mark.parametrize("with_bias", [True, False]))

    def wrap(test):
        for mark in marks:
            test = mark(test)
        return test

    return wrap


@_grid(FORWARD_ACTS)
def test_forward_matches_reference(backend, dtype, act, shape, with_bias):
    M, R, C = shape
    z = randn(M, R, C, dtype=dtype, seed=1, shift=0.0)
    b = randn(M, C, dtype=dtype, seed=2) if with_bias else None
    want = _bias_act_reference(z.double().clone(), None if b is None else b.double(), act, 0.2)
    out = bias_act(z, b, act, slope=0.2, backend=backend)
    assert out is z  # in place
    # one rounding (z + b), then an exact select / one multiply: within an ulp of the float64 result
    torch.testing.assert_close(out.double(), want, rtol=TOL[dtype], atol=TOL[dtype])
    if backend == "cpu":  # the same float ops as torch's: bitwise for relu / identity
        ref = _bias_act_reference(randn(M, R, C, dtype=dtype, seed=1, shift=0.0), b, act, 0.2)
        if act != "leaky_relu":
            assert torch.equal(out, ref)


@_grid(BACKWARD_ACTS)
def test_backward_matches_reference(backend, dtype, act, shape, with_bias):
    M, R, C = shape
    h = _activations(act, M, R, C, dtype, seed=3)
    g = randn(M, R, C, dtype=dtype, seed=4)
    gb = torch.full((M, C), float("nan"), dtype=dtype) if with_bias else None  # every entry must be written
    want_gb = torch.empty(M, C, dtype=torch.float64) if with_bias else None
    want = _bias_act_backward_reference(g.double().clone(), h.double(), want_gb, act, 0.2)
    out = bias_act_backward(g, h, act, gb, slope=0.2, backend=backend)
    assert out is g
    torch.testing.assert_close(out.double(), want, rtol=TOL[dtype], atol=TOL[dtype])
    if with_bias:
        # R-term sums: float32 rounding grows with R; the reference is exact to float64
        torch.testing.assert_close(gb.double(), want_gb, rtol=TOL[dtype] * max(R, 1), atol=TOL[dtype] * max(R, 1))


@_grid(FORWARD_ACTS, with_bias=False)
def test_one_output_layer_forward(backend, dtype, act, shape):
    """out[m, r] = Σ_c act(z + b)[m, r, c]·w[m, c]: the following one-output layer's GEMM, folded in."""
    M, R, C = shape
    z, b, w = randn(M, R, C, dtype=dtype, seed=1, shift=0.0), randn(M, C, dtype=dtype, seed=2), randn(M, C, dtype=dtype, seed=3)
    out = torch.full((M, R), float("nan"), dtype=dtype)
    want_out = torch.empty(M, R, dtype=torch.float64)
    want = _bias_act_reference(z.double().clone(), b.double(), act, 0.2, w.double(), want_out)
    bias_act(z, b, act, 0.2, out_weight=w, out=out, backend=backend)
    torch.testing.assert_close(z.double(), want, rtol=TOL[dtype], atol=TOL[dtype])
    torch.testing.assert_close(out.double(), want_out, rtol=TOL[dtype] * C, atol=TOL[dtype] * C)


@_grid(BACKWARD_ACTS)
def test_one_output_layer_backward(backend, dtype, act, shape, with_bias):
    """g = (u ⊗ w)·act'(h) from the one-output layer's output gradient u (g's input is ignored), and
    that layer's weight gradient Σ_r u h."""
    M, R, C = shape
    h = _activations(act, M, R, C, dtype, seed=3)
    u, w = randn(M, R, dtype=dtype, seed=4), randn(M, C, dtype=dtype, seed=5)
    g = torch.full((M, R, C), float("nan"), dtype=dtype)  # written only
    gb = torch.full((M, C), float("nan"), dtype=dtype) if with_bias else None
    gw = torch.full((M, C), float("nan"), dtype=dtype)
    want_g, want_gw = torch.empty(M, R, C, dtype=torch.float64), torch.empty(M, C, dtype=torch.float64)
    want_gb = torch.empty(M, C, dtype=torch.float64) if with_bias else None
    _bias_act_backward_reference(want_g, h.double(), want_gb, act, 0.2, u.double(), w.double(), want_gw)
    bias_act_backward(g, h, act, gb, 0.2, out_grad=u, out_weight=w, out_weight_grad=gw, backend=backend)
    torch.testing.assert_close(g.double(), want_g, rtol=TOL[dtype], atol=TOL[dtype])
    sums = TOL[dtype] * max(R, 1)
    torch.testing.assert_close(gw.double(), want_gw, rtol=sums, atol=sums)
    if with_bias:
        torch.testing.assert_close(gb.double(), want_gb, rtol=sums, atol=sums)


@pytest.mark.skipif(_C is None, reason="native module not built")
@pytest.mark.parametrize("act", BACKWARD_ACTS)
def test_backward_per_model_results_do_not_depend_on_the_batch_of_models(act):
    """Each model's bias sum runs over its rows in order: one model alone gives the same bits as in a
    batch of 37 (the further-training engine's chunking must not change a model's training)."""
    M, R, C = 37, 45, 300
    h = _activations(act, M, R, C, torch.float32, seed=5)
    g, u, w = randn(M, R, C, seed=6), randn(M, R, seed=7), randn(M, C, seed=8)
    gb, gw, gb2 = torch.empty(M, C), torch.empty(M, C), torch.empty(M, C)
    bias_act_backward(g.clone(), h, act, gb, slope=0.2, backend="cpu")
    bias_act_backward(g.clone(), h, act, gb2, 0.2, out_grad=u, out_weight=w, out_weight_grad=gw, backend="cpu")
    for m in (0, 17, 36):
        one = slice(m, m + 1)
        gb_m, gw_m, gb2_m = torch.empty(1, C), torch.empty(1, C), torch.empty(1, C)
        bias_act_backward(g[one].clone(), h[one], act, gb_m, slope=0.2, backend="cpu")
        bias_act_backward(g[one].clone(), h[one], act, gb2_m, 0.2, out_grad=u[one], out_weight=w[one],
                          out_weight_grad=gw_m, backend="cpu")
        assert torch.equal(gb_m[0], gb[m]) and torch.equal(gb2_m[0], gb2[m]) and torch.equal(gw_m[0], gw[m])


@pytest.mark.skipif(_C is None, reason="native module not built")
@settings(max_examples=40, deadline=None)
@given(M=st.integers(1, 5), R=st.integers(0, 40), C=st.integers(1, 600), act=st.sampled_from(BACKWARD_ACTS),
       slope=st.floats(0.0, 1.0), dtype=st.sampled_from([torch.float32, torch.float64]))
def test_cpu_hypothesis(M, R, C, act, slope, dtype):
    z = randn(M, R, C, dtype=dtype, seed=C, shift=0.0)
    b = randn(M, C, dtype=dtype, seed=R)
    if act in FORWARD_ACTS:
        want = _bias_act_reference(z.double().clone(), b.double(), act, slope)
        torch.testing.assert_close(bias_act(z.clone(), b, act, slope, backend="cpu").double(), want,
                                   rtol=TOL[dtype], atol=TOL[dtype])
    h = _activations("relu" if act == "leaky_relu" else act, M, R, C, dtype, seed=M)
    gb, want_gb = torch.empty(M, C, dtype=dtype), torch.empty(M, C, dtype=torch.float64)
    want = _bias_act_backward_reference(z.double().clone(), h.double(), want_gb, act, slope)
    out = bias_act_backward(z.clone(), h, act, gb, slope, backend="cpu")
    torch.testing.assert_close(out.double(), want, rtol=TOL[dtype], atol=TOL[dtype])
    torch.testing.assert_close(gb.double(), want_gb, rtol=TOL[dtype] * max(R, 1), atol=TOL[dtype] * max(R, 1))


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_finite_values_propagate_as_torch(backend):
    """NaN pre-activations stay NaN; at a NaN output relu's backward passes g and leaky_relu's scales
    it, exactly as aten's threshold_backward / leaky_relu_backward (what the GPU path runs)."""
    aten = torch.ops.aten
    z = torch.tensor([[[float("nan"), -1.0, 2.0]]])
    assert torch.equal(bias_act(z.clone(), None, "relu", backend=backend).isnan(), torch.tensor([[[True, False, False]]]))
    h = torch.tensor([[[float("nan"), 0.0, 2.0, -0.5]]])
    g = torch.tensor([[[3.0, 5.0, 7.0, 11.0]]])
    out = bias_act_backward(g.clone(), h, "relu", backend=backend)
    assert torch.equal(out, aten.threshold_backward(g, h, 0))
    out = bias_act_backward(g.clone(), h, "leaky_relu", slope=0.25, backend=backend)
    assert torch.equal(out, aten.leaky_relu_backward(g, h, 0.25, True))


@pytest.mark.parametrize("call,err,match", [
    (lambda z, b: bias_act(z[0], None), ValueError, "z: expected a 3-D tensor"),
    (lambda z, b: bias_act(z.transpose(1, 2).contiguous().transpose(1, 2), None), ValueError, "z: expected a contiguous"),
    (lambda z, b: bias_act(z.int(), None), TypeError, "z: expected dtype"),
    (lambda z, b: bias_act(z, b[:, :-1]), ValueError, r"bias: expected a contiguous tensor of shape \(2, 5\)"),
    (lambda z, b: bias_act(z, b.double()), TypeError, "bias: expected dtype"),
    (lambda z, b: bias_act(z, b, "tanh"), ValueError, "act: expected one of"),
    (lambda z, b: bias_act(z, b, "relu", slope=-0.1), ValueError, "slope"),
    (lambda z, b: bias_act_backward(z, z[:, :-1]), ValueError, r"h: expected a contiguous tensor of shape \(2, 3, 5\)"),
    (lambda z, b: bias_act_backward(z, z, "gelu"), ValueError, "act: expected one of"),
    (lambda z, b: bias_act_backward(z, z, "relu", b.t().contiguous()), ValueError, "bias_grad: expected"),
    (lambda z, b: bias_act(z, b, backend="cuda"), ValueError, "backend='cuda' cannot run bias_act"),
    (lambda z, b: bias_act(z, b, out_weight=b), ValueError, "out_weight, out: expected both or neither"),
    (lambda z, b: bias_act(z, b, out_weight=b, out=b), ValueError, r"out: expected a contiguous tensor of shape \(2, 3\)"),
    (lambda z, b: bias_act_backward(z, z, out_grad=z[:, :, 0]), ValueError, "expected all or none, got only out_grad"),
    (lambda z, b: bias_act_backward(z, z, out_grad=z[:, :, 0].contiguous(), out_weight=b, out_weight_grad=b[:1]),
     ValueError, r"out_weight_grad: expected a contiguous tensor of shape \(2, 5\)"),
])
def test_bad_inputs_name_the_argument(call, err, match):
    z, b = randn(2, 3, 5), randn(2, 5)
    with pytest.raises(err, match=match):
        call(z, b)


def test_backward_with_out_grad_rejects_g_sharing_h():
    """With out_grad, g is written before h is read for out_weight_grad: aliasing would give wrong sums."""
    h = randn(2, 3, 5).clamp(min=0)
    with pytest.raises(ValueError, match="g: expected memory separate from h's"):
        bias_act_backward(h, h, "relu", out_grad=randn(2, 3), out_weight=randn(2, 5), out_weight_grad=randn(2, 5))


def test_outputs_sharing_inputs_memory_are_refused():
    """Any output whose memory overlaps an input it is computed from (raw pointers see no aliasing)."""
    g, h, w = randn(2, 3, 5), randn(2, 3, 5), randn(2, 5)
    head = dict(out_grad=randn(2, 3), out_weight=w)
    with pytest.raises(ValueError, match="out_weight_grad: expected memory separate from out_weight's"):
        bias_act_backward(g, h, "relu", out_weight_grad=w, **head)
    with pytest.raises(ValueError, match="bias_grad: expected memory separate from out_weight's"):
        bias_act_backward(g, h, "relu", bias_grad=w, out_weight_grad=randn(2, 5), **head)
    with pytest.raises(ValueError, match="g: expected memory separate from out_grad's"):
        bias_act_backward(g, h, "relu", out_grad=g.view(-1)[:6].view(2, 3), out_weight=w, out_weight_grad=randn(2, 5))
    with pytest.raises(ValueError, match="bias_grad: expected memory separate from g's"):
        bias_act_backward(g, h, "relu", bias_grad=g.view(-1)[:10].view(2, 5))
    z = randn(2, 3, 5)
    with pytest.raises(ValueError, match="out: expected memory separate from z's"):
        bias_act(z, randn(2, 5), "relu", out_weight=w, out=z.view(-1)[:6].view(2, 3))
