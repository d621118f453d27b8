"""The native CUDA entry points of project / project_linear fail with a clear RuntimeError (not a
crash or a launch error) on a machine where the module was built with CUDA but no device is usable."""
import pytest
import torch

from fimoda_kernels._ext import _C

pytestmark = pytest.mark.skipif(_C is None or not _C.has_cuda or torch.cuda.is_available(),
                                reason="needs a CUDA build of _C on a machine without a usable GPU")


def test_project_cuda_raises_without_device():
    with pytest.raises(RuntimeError, match="no CUDA device available"):
        #              grads dtype out n  p  k  seed kind row_offset scale stream
        _C.project_cuda(0, 0, 0, 4, 4, 4, 0, 0, 0, 0.5, 0)


def test_project_linear_cuda_raises_without_device():
    with pytest.raises(RuntimeError, match="no CUDA device available"):
        #                     a  s  dtype out n  T  d_in d_out bias  k  seed kind row_offset scale stream
        _C.project_linear_cuda(0, 0, 0, 0, 4, 2, 3, 5, True, 4, 0, 1, 0, 0.5, 0)


@pytest.mark.parametrize("dtype_code", [0, 1, 2, 3])
def test_project_cuda_checks_device_before_arguments(dtype_code):
    """require_device() runs first: even a bad kind gives the no-device message here."""
    with pytest.raises(RuntimeError, match="no CUDA device available"):
        _C.project_cuda(0, dtype_code, 0, 1, 1, 1, 2**64 - 1, 7, 2**63 - 1, 1.0, 0)


def test_rademacher_bf16_cuda_raises_without_device():
    with pytest.raises(RuntimeError, match="no CUDA device available"):
        #                       out rows k  seed row_offset stream
        _C.rademacher_bf16_cuda(0, 4, 4, 0, 0, 0)
