"""The native CUDA entry points of grad_dot / grad_dot_factored fail with a clear RuntimeError (not a
crash or a launch error) on a machine where the module was built with CUDA but no device is usable."""
import pytest
import torch

from fimoda_kernels._ext import _C

pytestmark = pytest.mark.skipif(_C is None or not _C.has_cuda or torch.cuda.is_available(),
                                reason="needs a CUDA build of _C on a machine without a usable GPU")


@pytest.mark.parametrize("normalize", [False, True])
def test_grad_dot_cuda_raises_without_device(normalize):
    with pytest.raises(RuntimeError, match="no CUDA device available"):
        #                train test dtype out n  m  d  normalize  stream
        _C.grad_dot_cuda(0, 0, 0, 0, 4, 3, 5, normalize, 0)


@pytest.mark.parametrize("accumulate", [False, True])
def test_grad_dot_factored_cuda_raises_without_device(accumulate):
    with pytest.raises(RuntimeError, match="no CUDA device available"):
        #                         a  s  b  r  dtype out n  m  d_in d_out accumulate  stream
        _C.grad_dot_factored_cuda(0, 0, 0, 0, 0, 0, 4, 3, 5, 2, accumulate, 0)


@pytest.mark.parametrize("dtype_code", [0, 1, 2, 3, 9])
def test_grad_dot_cuda_checks_device_before_arguments(dtype_code):
    """require_device() runs first: even a bad dtype code or negative size gives the no-device message."""
    with pytest.raises(RuntimeError, match="no CUDA device available"):
        _C.grad_dot_cuda(0, 0, dtype_code, 0, -1, 0, 0, True, 0)
    with pytest.raises(RuntimeError, match="no CUDA device available"):
        _C.grad_dot_factored_cuda(0, 0, 0, 0, dtype_code, 0, 0, -1, 0, 0, False, 0)


def test_ops_report_cuda_backend_unavailable():
    """Through the op: an explicit backend="cuda" is refused with the reason, before any launch."""
    from fimoda_kernels.ops.grad_dot import grad_dot, grad_dot_factored

    with pytest.raises(ValueError, match="backend='cuda' cannot run grad_dot on cpu"):
        grad_dot(torch.randn(3, 4), torch.randn(2, 4), backend="cuda")
    with pytest.raises(ValueError, match="backend='cuda' cannot run grad_dot_factored on cpu"):
        grad_dot_factored([(torch.randn(3, 4), torch.randn(3, 2))], [(torch.randn(2, 4), torch.randn(2, 2))],
                          backend="cuda")
