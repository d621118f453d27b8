"""K-FAC / EK-FAC kernels in Triton (MATH.md §6); see fimoda_kernels/ops/ekfac.py for the ops.

- :func:`gram_accumulate`: C += f(X)ᵀ f(Y) over rows, f = identity or square. Symmetric mode
  (the factor accumulate, X = Y) computes only the upper tiles and mirrors each into the lower
  triangle, so each entry pair costs one dot product (syrk). Square mode is the T = 1 eigenvalue
  correction (s̃²)ᵀ(ã²), with the squaring fused into the operand loads.
- :func:`eigen_correction`: T > 1, one [BLOCK_O, BLOCK_J] tile of Λ per program: for every sample,
  P = Σ_t s̃_t ã_tᵀ in registers (tl.dot over position blocks), then Λ_tile += P ∘ P — the rotated
  per-sample gradient never leaves the registers.
- :func:`factored_scores`: out[i, z] += Σ_t s̃_{i,t}ᵀ W_z ã_{i,t}; one program per (block of training
  samples, test point): Y = ã W_zᵀ tile by tile, reduced against s̃ in registers.

Accumulation in C's / out's dtype (float32 or float64); float32 tiles through tl.dot at IEEE
precision, float64 as broadcast products (grad_dot's _mma). Inputs are already in that dtype.
"""
import torch
import triton
import triton.language as tl

from . import fit_float64_tile
from .grad_dot import _mma

# (BLOCK_A, BLOCK_B, BLOCK_K, num_warps): two output-tile sides and the reduction block.
# GPU float32: 64×64 accumulators with 16-wide reductions (grad_dot's register-safe choice).
_GPU_CONFIG = (64, 64, 16, 8)
_GPU_CONFIG_FP64 = (32, 32, 8, 8)  # the [A, K, B] broadcast product lives in registers
# Interpreter: per-program and per-iteration Python cost dominates, so tiles are large.
_INTERPRET_CONFIG = (128, 128, 128, 4)


def _config(dtype: torch.dtype, device: torch.device, a: int, b: int, k: int):
    caps = _INTERPRET_CONFIG if device.type != "cuda" else (
        _GPU_CONFIG_FP64 if dtype == torch.float64 else _GPU_CONFIG)
    lo = 16 if dtype != torch.float64 else 1  # tl.dot needs ≥ 16 per side
    ba, bb = min(caps[0], max(16, triton.next_power_of_2(a))), min(caps[1], max(16, triton.next_power_of_2(b)))
    bk = min(caps[2], max(lo, triton.next_power_of_2(max(k, 1))))
    if dtype == torch.float64:  # the [A, K, B] product must be one Triton tensor
        ba, bb, bk = fit_float64_tile(ba, bb, bk)
    return ba, bb, bk, caps[3]


@triton.jit
def _gram_kernel(x, y, c, rows, dx, dy, tiles_y, SYMMETRIC: tl.constexpr, SQUARE: tl.constexpr,
                 BLOCK_X: tl.constexpr, BLOCK_Y: tl.constexpr, BLOCK_R: tl.constexpr):
    pid = tl.program_id(0)
    pi = pid // tiles_y
    pj = pid % tiles_y
    cx = pi.to(tl.int64) * BLOCK_X + tl.arange(0, BLOCK_X).to(tl.int64)
    cy = pj.to(tl.int64) * BLOCK_Y + tl.arange(0, BLOCK_Y).to(tl.int64)
    live = pi <= (pj if SYMMETRIC else pi)  # symmetric: lower tiles mirror upper ones (no work, no store)
    mx = cx < tl.where(live, dx, 0)
    my = cy < dy
    n_rows = tl.where(live, rows, 0)
    acc = tl.zeros((BLOCK_X, BLOCK_Y), c.dtype.element_ty)
    for r0 in range(0, n_rows, BLOCK_R):
        rr = r0 + tl.arange(0, BLOCK_R).to(tl.int64)
        mr = rr < rows
        xt = tl.load(x + rr[None, :] * dx + cx[:, None], mask=mx[:, None] & mr[None, :], other=0.0)  # [BX, BR]
        yt = tl.load(y + rr[:, None] * dy + cy[None, :], mask=mr[:, None] & my[None, :], other=0.0)  # [BR, BY]
        if SQUARE:
            xt = xt * xt
            yt = yt * yt
        acc = _mma(acc, xt, yt)
    mask = mx[:, None] & my[None, :]
    ptr = c + cx[:, None] * dy + cy[None, :]
    tl.store(ptr, tl.load(ptr, mask=mask, other=0.0) + acc, mask=mask)
    if SYMMETRIC:
        # mirror into C[J, I] (a diagonal tile's mirror is itself: skip it)
        mirror = mask & (cx[:, None] < tl.where(pi < pj, dx, 0))
        mptr = c + cy[None, :] * dy + cx[:, None]
        tl.store(mptr, tl.load(mptr, mask=mirror, other=0.0) + acc, mask=mirror)


def gram_accumulate(C: torch.Tensor, X: torch.Tensor, Y: torch.Tensor, symmetric: bool, square: bool) -> None:
    """In place C [dx, dy] += f(X)ᵀ f(Y) for X [r, dx], Y [r, dy] (f = square with ``square``);
    ``symmetric`` (X is Y, C symmetric): upper tiles only, mirrored. C contiguous float32/float64."""
    X, Y = X.to(C.dtype).contiguous(), Y.to(C.dtype).contiguous()
    rows, dx = X.shape
    dy = Y.shape[1]
    if rows == 0 or dx == 0 or dy == 0:
        return
    bx, by, br, warps = _config(C.dtype, C.device, dx, dy, rows)
    if symmetric:
        bx = by = min(bx, by)
    tiles_y = triton.cdiv(dy, by)
    _gram_kernel[(triton.cdiv(dx, bx) * tiles_y,)](X, Y, C, rows, dx, dy, tiles_y, SYMMETRIC=symmetric,
                                                   SQUARE=square, BLOCK_X=bx, BLOCK_Y=by, BLOCK_R=br,
                                                   num_warps=warps)


@triton.jit
def _rotated_square_kernel(sr, ar, L, n, T, d_out, d_in, tiles_j,
                           BLOCK_O: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_T: tl.constexpr):
    pid = tl.program_id(0)
    co = (pid // tiles_j).to(tl.int64) * BLOCK_O + tl.arange(0, BLOCK_O).to(tl.int64)
    cj = (pid % tiles_j).to(tl.int64) * BLOCK_J + tl.arange(0, BLOCK_J).to(tl.int64)
    mo = co < d_out
    mj = cj < d_in
    acc = tl.zeros((BLOCK_O, BLOCK_J), L.dtype.element_ty)
    s_i = sr  # sample i's rows, advanced by pointer (64-bit) arithmetic
    a_i = ar
    for i in range(0, n):
        p = tl.zeros((BLOCK_O, BLOCK_J), L.dtype.element_ty)
        for t0 in range(0, T, BLOCK_T):
            tt = t0 + tl.arange(0, BLOCK_T).to(tl.int64)
            mt = tt < T
            st = tl.load(s_i + tt[None, :] * d_out + co[:, None], mask=mo[:, None] & mt[None, :], other=0.0)
            at = tl.load(a_i + tt[:, None] * d_in + cj[None, :], mask=mt[:, None] & mj[None, :], other=0.0)
            p = _mma(p, st, at)
        acc += p * p
        s_i += T * d_out
        a_i += T * d_in
    mask = mo[:, None] & mj[None, :]
    ptr = L + co[:, None] * d_in + cj[None, :]
    tl.store(ptr, tl.load(ptr, mask=mask, other=0.0) + acc, mask=mask)


def eigen_correction(L: torch.Tensor, sr: torch.Tensor, ar: torch.Tensor) -> None:
    """In place L [d_out, d_in] += Σ_i (Σ_t s̃_{i,t} ã_{i,t}ᵀ)² for contiguous sr [n, T, d_out],
    ar [n, T, d_in]; T = 1 goes to the square-mode Gram kernel."""
    sr, ar = sr.to(L.dtype).contiguous(), ar.to(L.dtype).contiguous()
    n, T, d_out = sr.shape
    d_in = ar.shape[2]
    if n == 0 or T == 0 or d_out == 0 or d_in == 0:
        return
    if T == 1:
        gram_accumulate(L, sr[:, 0], ar[:, 0], symmetric=False, square=True)
        return
    bo, bj, bt, warps = _config(L.dtype, L.device, d_out, d_in, T)
    tiles_j = triton.cdiv(d_in, bj)
    _rotated_square_kernel[(triton.cdiv(d_out, bo) * tiles_j,)](sr, ar, L, n, T, d_out, d_in, tiles_j,
                                                              BLOCK_O=bo, BLOCK_J=bj, BLOCK_T=bt, num_warps=warps)


@triton.jit
def _scores_kernel(sr, ar, W, out, n, T, m, d_out, d_in,
                   BLOCK_I: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_J: tl.constexpr):
    pid = tl.program_id(0)
    z = (pid % m).to(tl.int64)
    ci = (pid // m).to(tl.int64) * BLOCK_I + tl.arange(0, BLOCK_I).to(tl.int64)
    mi = ci < n
    acc = tl.zeros((BLOCK_I,), out.dtype.element_ty)
    w_base = W + z * d_out * d_in
    for t in range(0, T):
        row = ci * T + t
        for o0 in range(0, d_out, BLOCK_O):
            co = o0 + tl.arange(0, BLOCK_O).to(tl.int64)
            mo = co < d_out
            y = tl.zeros((BLOCK_I, BLOCK_O), out.dtype.element_ty)
            for j0 in range(0, d_in, BLOCK_J):
                cj = j0 + tl.arange(0, BLOCK_J).to(tl.int64)
                mj = cj < d_in
                at = tl.load(ar + row[:, None] * d_in + cj[None, :], mask=mi[:, None] & mj[None, :], other=0.0)
                wt = tl.load(w_base + co[None, :] * d_in + cj[:, None], mask=mj[:, None] & mo[None, :], other=0.0)
                y = _mma(y, at, wt)  # [BI, BO] = ã W_zᵀ
            st = tl.load(sr + row[:, None] * d_out + co[None, :], mask=mi[:, None] & mo[None, :], other=0.0)
            acc += tl.sum(st * y, axis=1)
    ptr = out + ci * m + z
    tl.store(ptr, tl.load(ptr, mask=mi, other=0.0) + acc, mask=mi)


def factored_scores(out: torch.Tensor, sr: torch.Tensor, ar: torch.Tensor, W: torch.Tensor) -> None:
    """In place out [n, m] += Σ_t s̃_{i,t}ᵀ W_z ã_{i,t} for contiguous sr [n, T, d_out], ar [n, T, d_in],
    W [m, d_out, d_in], all in out's dtype."""
    sr, ar, W = (t.to(out.dtype).contiguous() for t in (sr, ar, W))
    n, T, d_out = sr.shape
    m, _, d_in = W.shape
    if n == 0 or m == 0 or T == 0 or d_out == 0 or d_in == 0:
        return
    bi, bo, bj, warps = _config(out.dtype, out.device, n, d_out, d_in)
    _scores_kernel[(triton.cdiv(n, bi) * m,)](sr, ar, W, out, n, T, m, d_out, d_in,
                                             BLOCK_I=bi, BLOCK_O=bo, BLOCK_J=bj, num_warps=warps)
