"""Triton kernels (GPU; on CPU only under TRITON_INTERPRET=1, set before import)."""

# Triton's largest tensor (triton.language.core.TRITON_MAX_TENSOR_NUMEL).
MAX_NUMEL = 2**20


def fit_float64_tile(bx: int, by: int, bk: int) -> tuple[int, int, int]:
    """Blocks whose float64 broadcast product [bx, bk, by] (the kernels' tl.dot-free float64 path) is
    one Triton tensor at most: the reduction block bk is halved first, then the larger of bx, by."""
    while bx * by * bk > MAX_NUMEL:
        if bk > 1:
            bk //= 2
        elif bx >= by:
            bx //= 2
        else:
            by //= 2
    return bx, by, bk
