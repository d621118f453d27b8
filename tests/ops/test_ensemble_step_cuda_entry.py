"""The native CUDA entry point of ensemble_step fails with a clear RuntimeError (not a crash) where the
module was built with CUDA but no device is usable; the op refuses backend="cuda" for CPU tensors."""
import pytest
import torch

from fimoda_kernels._ext import _C
from fimoda_kernels.ops.ensemble_step import ensemble_step

needs_cuda_build = pytest.mark.skipif(_C is None or not _C.has_cuda or torch.cuda.is_available(),
                                      reason="needs a CUDA build of _C on a machine without a usable GPU")


@needs_cuda_build
@pytest.mark.parametrize("is_double", [False, True])
def test_ensemble_step_cuda_raises_without_device(is_double):
    with pytest.raises(RuntimeError, match="no CUDA device available"):
        #                     params grads s1 s2 coef seg n_seg max_seg M  double  opt  hp        stream
        _C.ensemble_step_cuda(0, 0, 0, 0, 0, 0, 2, 5, 3, is_double, 1, [0.0] * 8, 0)


def test_op_refuses_cuda_backend_for_cpu_tensors():
    p = torch.randn(2, 3)
    with pytest.raises(ValueError, match="backend='cuda' cannot run ensemble_step on cpu"):
        ensemble_step(p, torch.randn(2, 3), torch.tensor([1, 1]), optimizer="sgd", lr=0.1, backend="cuda")
