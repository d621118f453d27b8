"""Philox4x32-10 in Triton (MATH.md §9) and the philox4x32 op's kernel.

Triton's own ``tl.randint4x`` is the same function but fixes the counter layout; the library
needs the layout of MATH.md §9, so the rounds are written out here (uint32 arithmetic wraps).
"""
import torch
import triton
import triton.language as tl


@triton.jit
def philox4x32_10(c0, c1, c2, c3, k0, k1):
    """Ten Philox rounds on uint32 tensors; the key bump after the last round is unused."""
    for _ in tl.static_range(10):
        hi0 = tl.umulhi(c0, 0xD2511F53)
        hi1 = tl.umulhi(c2, 0xCD9E8D57)
        lo0 = c0 * 0xD2511F53
        lo1 = c2 * 0xCD9E8D57
        c0 = hi1 ^ c1 ^ k0
        c1 = lo1
        c2 = hi0 ^ c3 ^ k1
        c3 = lo0
        k0 = k0 + 0x9E3779B9
        k1 = k1 + 0xBB67AE85
    return c0, c1, c2, c3


@triton.jit
def _philox_kernel(counter, key, out, n, BLOCK: tl.constexpr):
    i = (tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)).to(tl.int64)
    m = i < n
    w0, w1, w2, w3 = philox4x32_10(tl.load(counter + 4 * i, mask=m).to(tl.uint32),
                                   tl.load(counter + 4 * i + 1, mask=m).to(tl.uint32),
                                   tl.load(counter + 4 * i + 2, mask=m).to(tl.uint32),
                                   tl.load(counter + 4 * i + 3, mask=m).to(tl.uint32),
                                   tl.load(key + 2 * i, mask=m).to(tl.uint32),
                                   tl.load(key + 2 * i + 1, mask=m).to(tl.uint32))
    tl.store(out + 4 * i, w0.to(tl.int64), mask=m)
    tl.store(out + 4 * i + 1, w1.to(tl.int64), mask=m)
    tl.store(out + 4 * i + 2, w2.to(tl.int64), mask=m)
    tl.store(out + 4 * i + 3, w3.to(tl.int64), mask=m)


def philox4x32(counter: torch.Tensor, key: torch.Tensor, out: torch.Tensor) -> None:
    """counter [n, 4], key [n, 2], out [n, 4]: contiguous int64 on one device."""
    n = counter.shape[0]
    if n:
        block = 1024
        _philox_kernel[(triton.cdiv(n, block),)](counter, key, out, n, BLOCK=block)
