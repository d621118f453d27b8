"""Gradient inner products in Triton (MATH.md §3 Grad-Dot / Grad-Cos, §4 the factored form).

Both kernels own one [BLOCK_N train rows × BLOCK_M test rows] output tile per program and build
it with the shared :func:`_tile_dot`, which walks the full reduction axis in BLOCK_D steps:

- :func:`grad_dot`: train @ testᵀ; for Grad-Cos the same loop also sums the squares of the tiles
  it loads (the program sees every column of its rows), and the epilogue divides by the norms
  (a zero norm gives 0, never NaN);
- :func:`grad_dot_factored`: per layer, the A·Bᵀ tile (over d_in) and the S·Rᵀ tile (over
  d_out), multiplied in registers; one launch per layer, the first writing the output tile and
  the later ones adding to it (ACCUMULATE), so layers sum in a fixed order without atomics and
  no n × m temporary exists.

Accumulation is float32 (float64 for float64 inputs); float32 tiles go through tl.dot at IEEE
precision (no TF32), float16/bfloat16 tiles through tl.dot natively on the GPU (exact products,
float32 sums), float64 as a broadcast product summed over the reduction axis.
"""
import torch
import triton
import triton.language as tl

from . import fit_float64_tile

# Block caps (BLOCK_N, BLOCK_M, BLOCK_D, num_warps); BLOCK_N and BLOCK_M are the next power of two
# of n and m clamped to [16, cap] (16: tl.dot's minimum operand size), BLOCK_D likewise of d.
# GPU caps: compiled for sm_90 with triton 3.6 and 3.9 (PTX from triton.compile for a
# GPUTarget("cuda", 90, 32), then ptxas -v), the largest tiles found without register spills in
# either kernel, whether d is divisible by 16 (vectorized, cp.async-pipelined loads) or not (scalar
# loads; common in the factored form, whose d_in carries the bias column):
# float32 (IEEE tl.dot = FMA work): 80-162 registers (BLOCK_D = 32 spills a little on 3.6).
_GPU_CONFIG = (64, 64, 16, 8)
# float16/bfloat16 (wgmma, float32 accumulators): 60-216 registers; 128×128 tiles spill in the
# factored kernel (two live accumulators) when d is not a multiple of 16.
_GPU_CONFIG_LOW = (128, 64, 32, 8)
# float64 (no tl.dot, see _mma): the [BLOCK_N, BLOCK_D, BLOCK_M] product lives in registers
# (32·8·32 doubles = 32 per thread at 8 warps; 104-128 registers; BLOCK_D = 16 spills).
_GPU_CONFIG_FP64 = (32, 32, 8, 8)
# Interpreter (CPU): every program instance and loop iteration costs milliseconds of Python while
# numpy is fast on big tiles, so tiles are as large as the shape allows.
_INTERPRET_CONFIG = (128, 128, 128, 4)


@triton.jit
def _mma(acc, x, y):
    """acc + x @ y for x [BN, BD], y [BD, BM] (both already in their dot dtype): float32 through
    tl.dot at IEEE precision (no TF32), float16/bfloat16 through tl.dot with float32
    accumulation, float64 as a broadcast product summed over the reduction axis (tl.dot on
    float64 is not lowered by every Triton release this library supports)."""
    if x.dtype == tl.float64:
        acc = acc + tl.sum(x[:, :, None] * y[None, :, :], axis=1)
    elif x.dtype == tl.float32:
        acc = tl.dot(x, y, acc, input_precision="ieee")
    else:
        acc = tl.dot(x, y, acc)
    return acc


@triton.jit
def _tile_dot(x, y, rows_x, rows_y, n_x, n_y, d, NORMS: tl.constexpr, NATIVE: tl.constexpr,
              BLOCK_X: tl.constexpr, BLOCK_Y: tl.constexpr, BLOCK_D: tl.constexpr):
    """(X[rows_x] @ Y[rows_y]ᵀ [BLOCK_X, BLOCK_Y], ‖X[rows_x]‖² [BLOCK_X], ‖Y[rows_y]‖² [BLOCK_Y])
    for contiguous X [n_x, d], Y [n_y, d]; rows_x/rows_y: int64 row indices (masked past n_x/n_y,
    those rows read as 0). The squared norms come from the very tiles the dot consumes and stay 0
    unless NORMS. Float32 (float64 for float64 inputs) accumulation; NATIVE: feed float16/bfloat16
    tiles to tl.dot as they are (on the GPU; the interpreter's bfloat16 dot is broken, so there
    they are widened to float32 first — the products are exact either way)."""
    ACC: tl.constexpr = tl.float64 if x.dtype.element_ty == tl.float64 else tl.float32
    acc = tl.zeros((BLOCK_X, BLOCK_Y), ACC)
    sq_x = tl.zeros((BLOCK_X,), ACC)
    sq_y = tl.zeros((BLOCK_Y,), ACC)
    mask_x = rows_x < n_x
    mask_y = rows_y < n_y
    x_ptr = x + rows_x[:, None] * d  # [BLOCK_X, 1]
    y_ptr = y + rows_y[None, :] * d  # [1, BLOCK_Y]: Y's tile is loaded transposed, [BLOCK_D, BLOCK_Y]
    for k0 in range(0, d, BLOCK_D):
        kk = k0 + tl.arange(0, BLOCK_D)
        k_mask = kk < d
        xt = tl.load(x_ptr + kk[None, :], mask=mask_x[:, None] & k_mask[None, :], other=0.0)
        yt = tl.load(y_ptr + kk[:, None], mask=k_mask[:, None] & mask_y[None, :], other=0.0)
        if NATIVE:
            acc = _mma(acc, xt, yt)
        else:
            acc = _mma(acc, xt.to(ACC), yt.to(ACC))
        if NORMS:
            xf = xt.to(ACC)
            yf = yt.to(ACC)
            sq_x += tl.sum(xf * xf, axis=1)
            sq_y += tl.sum(yf * yf, axis=0)
    return acc, sq_x, sq_y


@triton.jit
def _inv_norm(sq):
    """1/sqrt(sq) correctly rounded where sq > 0, else 0 (the Grad-Cos zero-norm rule)."""
    pos = sq > 0
    safe = tl.where(pos, sq, 1.0)  # no 1/0 on the zero-norm lanes
    if sq.dtype == tl.float64:
        inv = 1.0 / tl.sqrt(safe)  # float64 sqrt and division are IEEE on every target
    else:
        inv = tl.div_rn(tl.full(sq.shape, 1.0, tl.float32), tl.sqrt_rn(safe))
    return tl.where(pos, inv, 0.0)


@triton.jit
def _tile_coords(n, m, num_m_tiles, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr):
    """int64 (rows, cols) of this program's output tile; tiles in row-major order (m fastest, so
    programs sharing a train row block run together)."""
    tile = tl.program_id(0)
    pid_n = tile // num_m_tiles
    pid_m = tile % num_m_tiles
    rows = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    cols = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    return rows, cols


@triton.jit
def _grad_dot_kernel(train, test, out, n, m, d, num_m_tiles, NORMALIZE: tl.constexpr, NATIVE: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    rows, cols = _tile_coords(n, m, num_m_tiles, BLOCK_N, BLOCK_M)
    acc, sq_tr, sq_te = _tile_dot(train, test, rows, cols, n, m, d, NORMALIZE, NATIVE, BLOCK_N, BLOCK_M, BLOCK_D)
    if NORMALIZE:
        acc = acc * _inv_norm(sq_tr)[:, None] * _inv_norm(sq_te)[None, :]
    mask = (rows < n)[:, None] & (cols < m)[None, :]
    tl.store(out + rows[:, None] * m + cols[None, :], acc, mask=mask)


@triton.jit
def _factored_kernel(a, s, b, r, out, n, m, d_in, d_out, num_m_tiles, ACCUMULATE: tl.constexpr,
                     NATIVE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    rows, cols = _tile_coords(n, m, num_m_tiles, BLOCK_N, BLOCK_M)
    ab, _, _ = _tile_dot(a, b, rows, cols, n, m, d_in, False, NATIVE, BLOCK_N, BLOCK_M, BLOCK_D)
    sr, _, _ = _tile_dot(s, r, rows, cols, n, m, d_out, False, NATIVE, BLOCK_N, BLOCK_M, BLOCK_D)
    val = ab * sr
    mask = (rows < n)[:, None] & (cols < m)[None, :]
    ptr = out + rows[:, None] * m + cols[None, :]
    if ACCUMULATE:
        val += tl.load(ptr, mask=mask, other=0.0)
    tl.store(ptr, val, mask=mask)


def _out_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _config(n: int, m: int, d: int, dtype: torch.dtype, device: torch.device) -> tuple[int, int, int, int]:
    """(BLOCK_N, BLOCK_M, BLOCK_D, num_warps) for this problem."""
    if device.type != "cuda":
        caps = _INTERPRET_CONFIG
    elif dtype == torch.float64:
        caps = _GPU_CONFIG_FP64
    elif dtype in (torch.float16, torch.bfloat16):
        caps = _GPU_CONFIG_LOW
    else:
        caps = _GPU_CONFIG
    # On the GPU, BLOCK_N is fixed (not fitted to n): the in-tile row norms are reduced in an order
    # set by the tile layout, so a chunk of train rows (grad_dot's top-k path) must see the same
    # layout as the whole set to score bitwise alike.
    bn = caps[0] if device.type == "cuda" else min(caps[0], max(16, triton.next_power_of_2(n)))
    bm = min(caps[1], max(16, triton.next_power_of_2(m)))
    bd = min(caps[2], max(16 if dtype != torch.float64 else 1, triton.next_power_of_2(max(d, 1))))
    if dtype == torch.float64:  # the [BLOCK_N, BLOCK_D, BLOCK_M] product must be one Triton tensor
        bn, bm, bd = fit_float64_tile(bn, bm, bd)
    return bn, bm, bd, caps[3]


def _native(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether float16/bfloat16 tiles go to tl.dot unwidened (not the interpreter's bfloat16 dot)."""
    return dtype == torch.float16 or (dtype == torch.bfloat16 and device.type == "cuda")


def grad_dot(train: torch.Tensor, test: torch.Tensor, normalize: bool) -> torch.Tensor:
    """train @ testᵀ ([n, m] float32, float64 for float64 inputs) for contiguous train [n, d],
    test [m, d] of one dtype (float32/16, bfloat16, float64); with ``normalize`` each entry is
    divided by ‖train_i‖‖test_j‖ (norms from the same pass over d; a zero norm gives 0)."""
    n, d = train.shape
    m = test.shape[0]
    out_dtype = _out_dtype(train.dtype)
    if n == 0 or m == 0 or d == 0:  # nothing to read (and empty tensors' pointers a GPU launch rejects)
        return torch.zeros(n, m, dtype=out_dtype, device=train.device)
    out = torch.empty(n, m, dtype=out_dtype, device=train.device)
    bn, bm, bd, num_warps = _config(n, m, d, train.dtype, train.device)
    num_m_tiles = triton.cdiv(m, bm)
    _grad_dot_kernel[(triton.cdiv(n, bn) * num_m_tiles,)](
        train, test, out, n, m, d, num_m_tiles, NORMALIZE=bool(normalize),
        NATIVE=_native(train.dtype, train.device), BLOCK_N=bn, BLOCK_M=bm, BLOCK_D=bd, num_warps=num_warps)
    return out


def grad_dot_factored(A, S, B, R) -> torch.Tensor:
    """Σ_l (A[l] @ B[l]ᵀ) ∘ (S[l] @ R[l]ᵀ) ([n, m] float32, float64 for float64 inputs) from lists
    (one entry per layer) of contiguous A[l] [n, d_in], S[l] [n, d_out], B[l] [m, d_in],
    R[l] [m, d_out], all of one dtype: one fused launch per layer, each adding into the output."""
    n, m = A[0].shape[0], B[0].shape[0]
    dtype, device = A[0].dtype, A[0].device
    out_dtype = _out_dtype(dtype)
    layers = [(a, s, b, r) for a, s, b, r in zip(A, S, B, R) if a.shape[1] and s.shape[1]]  # others add 0
    if n == 0 or m == 0 or not layers:
        return torch.zeros(n, m, dtype=out_dtype, device=device)
    out = torch.empty(n, m, dtype=out_dtype, device=device)
    bn, bm, _, num_warps = _config(n, m, 1, dtype, device)
    num_m_tiles = triton.cdiv(m, bm)
    grid = (triton.cdiv(n, bn) * num_m_tiles,)
    native = _native(dtype, device)
    for l, (a, s, b, r) in enumerate(layers):
        # BLOCK_D from this layer alone: a layer adds bitwise the same whatever the other layers are
        bd = _config(n, m, max(a.shape[1], s.shape[1]), dtype, device)[2]
        _factored_kernel[grid](a, s, b, r, out, n, m, a.shape[1], s.shape[1], num_m_tiles, ACCUMULATE=l > 0,
                               NATIVE=native, BLOCK_N=bn, BLOCK_M=bm, BLOCK_D=bd, num_warps=num_warps)
    return out
