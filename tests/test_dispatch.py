"""The op contract: explicit backends, automatic choice, FIMODA_BACKEND, warnings, info."""
import os
import subprocess
import sys
import warnings

import pytest
import torch

import fimoda_kernels
from fimoda_kernels import _dispatch
from fimoda_kernels._dispatch import FallbackWarning, available_backends, op
from fimoda_kernels._ext import _C


def test_every_op_has_every_backend_and_a_reference():
    import fimoda_kernels.ops.philox as philox
    import fimoda_kernels.ops.projection_matrix as pm

    for name in ("philox4x32", "projection_matrix"):
        assert set(op(name).impls) == set(_dispatch.BACKENDS)
    assert callable(philox._philox4x32_reference) and callable(pm._projection_matrix_reference)


def test_automatic_choice_on_cpu_is_native(monkeypatch):
    monkeypatch.delenv("FIMODA_BACKEND", raising=False)
    assert available_backends("projection_matrix", "cpu")[:2] == ["cpu", "torch"]
    assert op("projection_matrix").select(None, "cpu", torch.float32).backend == "cpu"


def test_explicit_backend_that_cannot_run_lists_reasons():
    with pytest.raises(ValueError, match=r"backend='cuda' cannot run projection_matrix on cpu: .*CUDA tensors"):
        fimoda_kernels.projection_matrix(4, 4, 0, backend="cuda")


def test_env_override(monkeypatch):
    monkeypatch.setenv("FIMODA_BACKEND", "torch")
    assert op("projection_matrix").select(None, "cpu", torch.float32).backend == "torch"
    monkeypatch.setenv("FIMODA_BACKEND", "cuda")
    with pytest.raises(ValueError, match="FIMODA_BACKEND='cuda' cannot run"):
        fimoda_kernels.projection_matrix(4, 4, 0)
    monkeypatch.setenv("FIMODA_BACKEND", "bogus")
    with pytest.raises(ValueError, match="FIMODA_BACKEND: expected one of"):
        fimoda_kernels.projection_matrix(4, 4, 0)
    # an explicit argument wins over the environment
    assert fimoda_kernels.projection_matrix(4, 4, 0, backend="cpu").shape == (4, 4)


def test_fallback_warns_with_reason(monkeypatch):
    monkeypatch.delenv("FIMODA_BACKEND", raising=False)
    real = _dispatch.backend_unavailable_reasons

    def no_native(backend, device):
        return ["native module not built (test)"] if backend == "cpu" else real(backend, device)

    monkeypatch.setattr(_dispatch, "backend_unavailable_reasons", no_native)
    with pytest.warns(FallbackWarning, match="using the torch backend because cpu cannot run: native module not built"):
        out = fimoda_kernels.projection_matrix(5, 3, 1)
    assert torch.equal(out, fimoda_kernels.projection_matrix(5, 3, 1, backend="torch"))


def test_no_warning_on_the_preferred_path(monkeypatch):
    monkeypatch.delenv("FIMODA_BACKEND", raising=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fimoda_kernels.projection_matrix(5, 3, 1)


def test_available_backends_bad_name():
    with pytest.raises(ValueError, match="op_name: expected one of"):
        available_backends("nope")


@pytest.mark.skipif(_C is None or not _C.has_cuda or torch.cuda.is_available(),
                    reason="needs a CUDA-enabled build on a machine without a GPU")
def test_cuda_entry_points_raise_clearly_without_device():
    count, why = _C.cuda_device_count()
    assert count == 0 and why
    with pytest.raises(RuntimeError, match="no CUDA device available"):
        _C.projection_matrix_cuda(0, False, 4, 4, 0, 0, 0, 0.5, 0)
    with pytest.raises(RuntimeError, match="no CUDA device available"):
        _C.philox4x32_cuda(0, 0, 0, 1, 0)


def test_info_reports_backends():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-m", "fimoda_kernels.info"], capture_output=True, text=True,
                         env=env, check=True).stdout
    assert "cpu    [cpu] available" in out and "torch  [cpu] available" in out
    assert "triton [cpu] unavailable: triton on CPU tensors needs TRITON_INTERPRET=1" in out or \
        "triton not importable" in out
    assert "projection_matrix" in out and "philox4x32" in out
    if _C.has_cuda and not torch.cuda.is_available():
        assert "cuda   [cuda] unavailable: compiled, no device" in out
    interp = subprocess.run([sys.executable, "-m", "fimoda_kernels.info"], capture_output=True, text=True,
                            env={**env, "TRITON_INTERPRET": "1"}, check=True).stdout
    if "triton not importable" not in out:
        assert "triton [cpu] available (interpreter mode" in interp


def test_build_info_present():
    info = fimoda_kernels._ext.build_info()
    assert {"compiler", "cxx_flags", "openmp", "cuda", "cuda_architectures"} <= set(info)
    if info["cuda"]:
        assert info["cuda_architectures"]


@pytest.mark.parametrize("archs,capability,runs", [
    (["80-real", "90-real", "90-virtual"], (9, 0), True),   # the default build on an H100/H200
    (["80-real", "90-real", "90-virtual"], (8, 6), True),   # sm_80 machine code runs on sm_86
    (["80-real", "90-real", "90-virtual"], (7, 0), False),  # a V100: no code, the backend is unavailable
    (["80-real", "90-real", "90-virtual"], (10, 0), True),  # PTX 9.0, JIT-compiled
    (["90-real"], (10, 0), False), (["90"], (9, 0), True), (["8.0+PTX"], (8, 9), True), (["70-real"], (8, 0), False),
])
def test_cuda_build_architectures_against_the_device(archs, capability, runs):
    from fimoda_kernels._ext import arch_runs

    assert arch_runs(archs, capability) is runs


def test_environment_overrides_are_checked(monkeypatch):
    """FIMODA_BACKEND names itself when invalid; FIMODA_SIMD is case-insensitive and an unknown value
    means "the best this CPU runs" (it used to force the slowest path silently)."""
    import os
    import subprocess
    import sys

    import fimoda_kernels as fk

    monkeypatch.setenv("FIMODA_BACKEND", "CPU")
    with pytest.raises(ValueError, match=r"FIMODA_BACKEND: expected one of .* got 'CPU'"):
        fk.philox4x32(torch.zeros(1, 4, dtype=torch.int64), torch.zeros(2, dtype=torch.int64))
    monkeypatch.delenv("FIMODA_BACKEND")
    if fk._ext._C is None:
        return

    def isa(value):
        env = {k: v for k, v in os.environ.items() if k != "FIMODA_SIMD"}
        if value is not None:
            env["FIMODA_SIMD"] = value
        code = "from fimoda_kernels._ext import _C; print(_C.cpu_simd())"
        return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                              check=True).stdout.strip()

    assert isa("bogus") == isa("") == isa(None)
    assert isa("AVX2") == isa("avx2") and isa("Scalar") == "scalar"


def _op_calls():
    """One call per op, its first tensor argument built by ``t`` (so it can require grad)."""
    import fimoda_kernels as fk
    from fimoda_kernels.ops.conv_patches import conv_patches

    r = lambda *shape: torch.randn(*shape, generator=torch.Generator().manual_seed(len(shape)))
    eig = [(torch.eye(3), torch.ones(3), torch.eye(2), torch.ones(2))]
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))  # 21 parameters
    hvp = fk.gn_hvp(model, "mse", r(9, 3), r(9))
    return {
        "project": lambda t: fk.project(t(r(3, 70)), 2100, 0),  # two column blocks of the cpu path
        "project_linear": lambda t: fk.project_linear(t(r(3, 60)), r(3, 9), 2100, 0),
        "grad_dot": lambda t: fk.grad_dot(t(r(4, 5)), r(3, 5)),
        "grad_dot_factored": lambda t: fk.grad_dot_factored([(t(r(4, 3)), r(4, 2))], [(r(2, 3), r(2, 2))]),
        "lissa_update": lambda t: fk.lissa_update(t(r(2, 5)), r(2, 5), r(2, 5), 10.0, 0.1),
        "kfac_factors": lambda t: fk.kfac_factors([[(t(r(4, 3)), r(4, 2))]]),
        "ekfac_scores": lambda t: fk.ekfac_scores([(t(r(4, 3)), r(4, 2))], eig, [r(2, 2, 3)]),
        "conv_patches": lambda t: conv_patches(t(r(1, 2, 4, 4)), 3),
        # the HVP operators write into workspaces, the solvers call lissa_update: named as theirs
        "gn_hvp": lambda t: hvp(t(r(2, 21))),
        "cg": lambda t: fk.cg(hvp, t(r(2, 21)), 0.1),
        "lissa": lambda t: fk.lissa(hvp, t(r(2, 21)), 5, 10.0, 0.1),
    }


@pytest.mark.parametrize("name", list(_op_calls()))
def test_ops_refuse_inputs_that_require_grad(name):
    """The ops are not differentiable: the native kernels read raw memory autograd does not see (the
    cpu projection's input gradient was wrong by up to 110%, silently; triton's missing). An input
    that requires grad is refused while grad mode is on; under no_grad the call runs."""
    call = _op_calls()[name]
    with pytest.raises(ValueError, match=r"^(v|V|grads|a|x|h|train|train_layers\[0\] a|batches\[0\]\[0\] a): "
                                         "expected a tensor that does not require grad"):
        call(lambda x: x.requires_grad_())
    with torch.no_grad():
        call(lambda x: x.requires_grad_())


def test_in_place_ops_tell_autograd():
    """ensemble_step and lissa_update write through raw pointers: a graph that saved the tensor they
    updated must refuse to backpropagate, as after a torch in-place op (it used the new values)."""
    import fimoda_kernels as fk

    for backend in ("cpu", "torch"):
        p = torch.randn(3, 4, requires_grad=True)
        loss = (p * p).sum()
        with torch.no_grad():  # as an optimizer step
            fk.ensemble_step(p, torch.ones(3, 4), torch.ones(3, dtype=torch.int64), optimizer="sgd", lr=0.1,
                             backend=backend)
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            loss.backward()
    h = torch.randn(2, 5, requires_grad=True)
    loss = (h * h).sum()
    with torch.no_grad():
        fk.lissa_update(h, torch.randn(2, 5), torch.randn(2, 5), 10.0, 0.1, out=h, backend="cpu")
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


@pytest.mark.parametrize("device", ["meta", pytest.param("cuda", id="gpu_without_cuda")])
def test_unusable_devices_are_named(device):
    import fimoda_kernels as fk

    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    with pytest.raises(ValueError, match=f"device: expected a device with data that this torch can use, got {device}"):
        fk.projection_matrix(4, 4, 0, device=device)
    if device == "meta":
        with pytest.raises(ValueError, match="device: .* got meta"):
            fk.project(torch.empty(2, 3, device="meta"), 4, 0)


def test_all_finite_sums_first_and_scans_when_the_sum_overflows():
    from fimoda_kernels._validate import all_finite

    big = torch.full((4, 3), 3e38)  # finite entries whose sum overflows float32
    assert all_finite(big) and all_finite(big.half().clamp(-6e4, 6e4)) and all_finite(torch.empty(0))
    for bad in (float("nan"), float("inf"), -float("inf")):
        x = torch.randn(5, 7)
        x[3, 2] = bad
        assert not all_finite(x) and not all_finite(x.double()) and not all_finite(x.bfloat16())
    assert not all_finite(torch.tensor([float("inf"), -float("inf")]))  # a sum of NaN, entries not finite
