"""The native CUDA entry points of the EK-FAC kernels fail with a clear RuntimeError (not a crash or a
launch error) on a machine where the module was built with CUDA but no device is usable."""
import pytest
import torch

from fimoda_kernels._ext import _C

pytestmark = pytest.mark.skipif(_C is None or not _C.has_cuda or torch.cuda.is_available(),
                                reason="needs a CUDA build of _C on a machine without a usable GPU")


@pytest.mark.parametrize("fp64", [False, True])
def test_ekfac_cuda_entries_raise_without_device(fp64):
    with pytest.raises(RuntimeError, match="no CUDA device available"):
        #                  x  y  c  fp64  rows dx dy symmetric square stream
        _C.ekfac_gram_cuda(0, 0, 0, fp64, 4, 3, 3, True, False, 0)
    with pytest.raises(RuntimeError, match="no CUDA device available"):
        #                            sr ar L  fp64  n  T  d_out d_in stream
        _C.ekfac_rotated_square_cuda(0, 0, 0, fp64, 4, 2, 3, 5, 0)
    with pytest.raises(RuntimeError, match="no CUDA device available"):
        #                    sr ar W  out fp64  n  T  m  d_out d_in stream
        _C.ekfac_scores_cuda(0, 0, 0, 0, fp64, 4, 1, 3, 2, 5, 0)


def test_ekfac_ops_report_cuda_backend_unavailable():
    from fimoda_kernels.ops.ekfac import kfac_factors

    with pytest.raises(ValueError, match="backend='cuda' cannot run kfac_factors on cpu"):
        kfac_factors([[(torch.randn(3, 4), torch.randn(3, 2))]], backend="cuda")
