"""Fused LiSSA update in Triton (MATH.md §5): out = v + (1 − d)·h − mh / s for contiguous [r, p]
blocks, plus every output row's squared norm.

Program (c, i) handles columns [c·BLOCK, (c+1)·BLOCK) of row i and stores its sum of squares in
partials[i, c]; the host adds each row's partials (a [r, chunks] sum, tiny next to the [r, p] pass).
Accumulation in float32 for float32, float64 for float64.
"""
import torch
import triton
import triton.language as tl

_GPU_BLOCK, _GPU_WARPS = 2048, 8
_INTERPRET_BLOCK = 8192  # the interpreter pays per program instance: few, large blocks


@triton.jit
def _update_kernel(h, v, mh, out, partials, coef, p, chunks, BLOCK: tl.constexpr):
    c = tl.program_id(0)
    keep = tl.load(coef)
    inv_scale = tl.load(coef + 1)
    row = tl.program_id(1).to(tl.int64)
    cols = c.to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    mask = cols < p
    offs = row * p + cols
    x = (tl.load(v + offs, mask=mask, other=0.0) + keep * tl.load(h + offs, mask=mask, other=0.0)
         - tl.load(mh + offs, mask=mask, other=0.0) * inv_scale)
    tl.store(out + offs, x, mask=mask)
    tl.store(partials + row * chunks + c, tl.sum(x * x, axis=0))


def lissa_update(h: torch.Tensor, v: torch.Tensor, mh: torch.Tensor, out: torch.Tensor, scale: float,
                 damping: float) -> torch.Tensor:
    """Writes out (may alias an input) and returns the squared row norms ``[r]`` in out's dtype."""
    r, p = h.shape
    if r == 0 or p == 0:
        return torch.zeros(r, dtype=h.dtype, device=h.device)
    block = _INTERPRET_BLOCK if h.device.type != "cuda" else _GPU_BLOCK
    block = min(block, max(16, triton.next_power_of_2(p)))
    chunks = triton.cdiv(p, block)
    partials = torch.empty(r, chunks, dtype=h.dtype, device=h.device)
    # 1 − d and 1/s in the element type, as the cpu and cuda kernels round them (a Python float
    # argument would be passed as float32 even to a float64 kernel)
    coef = torch.tensor([1.0 - damping, 1.0 / scale], dtype=torch.float64).to(h.dtype).to(h.device)
    for r0 in range(0, r, 65535):  # grid y is limited to 65535
        rr = min(r, r0 + 65535) - r0
        _update_kernel[(chunks, rr)](h[r0:], v[r0:], mh[r0:], out[r0:], partials[r0:], coef, p, chunks,
                                     BLOCK=block, num_warps=_GPU_WARPS)
    return partials.sum(1)
