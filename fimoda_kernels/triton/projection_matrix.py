"""Projection matrix P (MATH.md §9) in Triton: one program per [BLOCK_R rows × BLOCK_G column
groups] tile; each Philox call yields 4 Rademacher or 2 Gaussian columns, interleaved into the
output tile with tl.join so stores stay contiguous along a row. :func:`p_tile` generates such a
tile in registers; the projection kernels (``project.py``) use it too, so there is one P."""
import torch
import triton
import triton.language as tl

from .philox import philox4x32_10


@triton.jit
def _gaussian(wa, wb, scale, DTYPE: tl.constexpr):
    """MATH.md §9's Box–Muller entry. float64: the formula as written. float32: both factors from the
    Philox words' integer bits, as the CPU kernel (csrc/cpu/fast_math.h), so every entry keeps ~1e-7
    relative accuracy: rounding u2 first would cost up to 5e-4 near the zeros of cos, and u1 = 1 − v·2^-32
    near 1 rounds to 1 (a zero entry) without the log1p form."""
    if DTYPE == tl.float64:
        u1 = (wa.to(DTYPE) + 1.0) * 2.3283064365386963e-10
        u2 = wb.to(DTYPE) * 2.3283064365386963e-10
        return tl.sqrt(-2.0 * tl.log(u1)) * tl.cos(6.283185307179586 * u2) * scale
    # ln u1: near 1 (v = 2^32 − 1 − w_a small) ln(1 − v·2^-32) by Kahan's log1p, log(1 + f)·f / ((1 + f) − 1)
    v = wa ^ 0xFFFFFFFF
    near = v < 0x4B000000
    f = (v & 0x7FFFFFFF).to(tl.float32) * -2.3283064365386963e-10
    u = 1.0 + f
    d = tl.where(u == 1.0, 1.0, u - 1.0)
    ln_near = tl.where(u == 1.0, f, tl.log(u) * (f / d))
    ln_far = tl.log((wa.to(tl.float32) + 1.0) * 2.3283064365386963e-10)
    radius = tl.sqrt(-2.0 * tl.where(near, ln_near, ln_far))
    # cos(2π w_b 2^-32) = cos(q·π/2 + θ), quadrant q and θ = x·π/4 (x ∈ [−1, 1)) exact from the bits
    t = wb + 0x20000000
    q = t >> 30
    x = ((t & 0x3FFFFFFF).to(tl.int32) - 0x20000000).to(tl.float32) * 1.862645149230957e-09
    theta = x * 0.7853981633974483
    c = tl.where((q & 1) == 1, tl.sin(theta), tl.cos(theta))
    c = tl.where(((q + 1) & 2) != 0, -c, c)  # q = 1: −sin θ, 2: −cos θ
    return radius * c * scale


@triton.jit
def p_tile(index, g, k0, k1, scale, GAUSSIAN: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_G: tl.constexpr):
    """P[index, g·PER_CALL : (g+1)·PER_CALL] as a [BLOCK_R, BLOCK_G·PER_CALL] tile in ``scale``'s dtype.

    index: int64 [BLOCK_R] global parameter indices (rows of P); g: [BLOCK_G] column groups (one
    Philox call each: 4 Rademacher or 2 Gaussian adjacent columns); k0, k1: the Philox key as
    integer scalar tensors (kernels pass them with do_not_specialize, never as constexpr 1);
    scale: 1/sqrt(k) rounded once on the host to the compute dtype, exactly as the other backends.
    """
    DTYPE: tl.constexpr = scale.dtype
    PER_CALL: tl.constexpr = 2 if GAUSSIAN else 4
    shape: tl.constexpr = (BLOCK_R, BLOCK_G)
    c0 = tl.broadcast_to(g[None, :].to(tl.uint32), shape)
    c1 = tl.broadcast_to((index & 0xFFFFFFFF).to(tl.uint32)[:, None], shape)
    c2 = tl.broadcast_to((index >> 32).to(tl.uint32)[:, None], shape)
    c3 = tl.full(shape, 1 if GAUSSIAN else 0, tl.uint32)
    key0 = tl.full(shape, 0, tl.uint32) + k0.to(tl.uint32)
    key1 = tl.full(shape, 0, tl.uint32) + k1.to(tl.uint32)
    w0, w1, w2, w3 = philox4x32_10(c0, c1, c2, c3, key0, key1)
    if GAUSSIAN:
        vals = tl.join(_gaussian(w0, w1, scale, DTYPE), _gaussian(w2, w3, scale, DTYPE))
    else:
        pos = tl.full(shape, 1.0, DTYPE) * scale
        # join appends a trailing axis: join(join(w0, w2), join(w1, w3)) flattens to w0 w1 w2 w3.
        vals = tl.join(tl.join(tl.where((w0 & 1) == 0, pos, -pos), tl.where((w2 & 1) == 0, pos, -pos)),
                       tl.join(tl.where((w1 & 1) == 0, pos, -pos), tl.where((w3 & 1) == 0, pos, -pos)))
    return tl.reshape(vals, (BLOCK_R, BLOCK_G * PER_CALL))


# k0/k1 never specialized: Triton turns an int argument equal to 1 into a constexpr (seed 1, 2^32, ...)
@triton.jit(do_not_specialize=["k0", "k1"])
def _projection_kernel(out, rows, k, k0, k1, row_offset, scale_ptr, GAUSSIAN: tl.constexpr,
                       BLOCK_R: tl.constexpr, BLOCK_G: tl.constexpr):
    PER_CALL: tl.constexpr = 2 if GAUSSIAN else 4
    r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
    g = tl.program_id(1) * BLOCK_G + tl.arange(0, BLOCK_G)
    vals = p_tile(row_offset + r, g, k0, k1, tl.load(scale_ptr), GAUSSIAN, BLOCK_R, BLOCK_G)
    j = tl.program_id(1).to(tl.int64) * (BLOCK_G * PER_CALL) + tl.arange(0, BLOCK_G * PER_CALL)
    mask = (r[:, None] < rows) & (j[None, :] < k)
    tl.store(out + r[:, None] * k + j[None, :], vals, mask=mask)


def projection_matrix(out: torch.Tensor, seed: int, kind: int, row_offset: int, scale: float) -> None:
    """Fill the contiguous float32/float64 [rows, k] tensor ``out`` with P[row_offset + r, j]."""
    rows, k = out.shape
    if rows == 0 or k == 0:
        return
    gaussian = kind == 1
    per_call = 2 if gaussian else 4
    block_g = min(64, triton.next_power_of_2(triton.cdiv(k, per_call)))
    block_r = max(1, min(64, 4096 // block_g))
    grid = (triton.cdiv(rows, block_r), triton.cdiv(triton.cdiv(k, per_call), block_g))
    if grid[1] > 65535:  # a CUDA grid's y limit
        raise ValueError(f"k: the triton projection_matrix takes at most {65535 * block_g * per_call} columns, "
                         f"got {k}; use the cpu or cuda backend")
    scale_t = torch.full((1,), scale, dtype=out.dtype, device=out.device)
    _projection_kernel[grid](out, rows, k, seed & 0xFFFFFFFF, seed >> 32, row_offset, scale_t,
                             GAUSSIAN=gaussian, BLOCK_R=block_r, BLOCK_G=block_g)
