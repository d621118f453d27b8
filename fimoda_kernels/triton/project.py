"""Random projection of per-sample gradients in Triton (MATH.md §9): out = X @ P[row_offset : row_offset + p].

One kernel serves both ops. Each program owns a [BLOCK_N samples × BLOCK_K columns] output tile
and walks its share of the parameter axis p in BLOCK_P steps: it forms the X tile [BLOCK_N,
BLOCK_P] (loaded from ``grads`` for :func:`project`; for :func:`project_linear` built on the fly as
X[i, o·d_in + c] = Σ_t s[i,t,o]·a[i,t,c], bias rows Σ_t s[i,t,o], never stored), generates the
matching P tile [BLOCK_P, BLOCK_K] in registers with the shared :func:`p_tile` (the very P of
``projection_matrix``), and accumulates X·P in float32 (float64 for float64 inputs): by IEEE
``tl.dot`` (FMA), or on GPUs with TF32 tensor cores by TF32 dots over operands split in registers
into TF32-exact parts (``_mma``; float32-level accuracy, no extra pass through memory).

Split-K: when the output tiles alone cannot fill the GPU, the p axis is cut into SPLIT contiguous
chunks (grid axis 1); split s writes its partial tile to buf[s] and the host sums buf over s in
a fixed order, so the result is deterministic (no atomics).
"""
import functools
import math

import torch
import triton
import triton.language as tl

from . import fit_float64_tile

from .projection_matrix import p_tile

# Block caps (BLOCK_N, BLOCK_K, BLOCK_P) and num_warps; BLOCK_N and BLOCK_K are the next power of
# two of n and k clamped to [16, cap] (16: tl.dot's minimum operand size).
# GPU, float32 (IEEE tl.dot = FMA, unrolled over BLOCK_P): each P tile is reused by 64 samples,
# amortizing Philox (~25 integer ops per entry); compiled for sm_90 this is the largest tile
# without register spills (252 registers at 8 warps; BLOCK_P=32 or 4 warps spill heavily). The
# TF32 split path (the sm_80+ default, see _mma) uses the same tiles; not yet tuned on a GPU.
_GPU_CONFIG = (64, 128, 16, 8)
# GPU, float64 (no tl.dot, see _mma): the [BLOCK_N, BLOCK_P, BLOCK_K] product lives in registers
# (16·8·64 doubles = 64 per thread at 4 warps; ~100 registers, no spills on sm_90).
_GPU_CONFIG_FP64 = (16, 64, 8, 4)
# Interpreter (CPU): every program instance and loop iteration costs milliseconds of Python (tens
# for a Philox tile) while numpy is fast on big tiles, so tiles are as large as the shape allows.
_INTERPRET_CONFIG = (64, 256, 128, 4)
# Split-K aims at this many programs per SM (one 8-warp CTA of 252 registers fits an SM: two waves
# even out the tail); in the interpreter programs run one after another, so splitting only adds
# work: target 1 there (tests override it).
_PROGRAMS_PER_SM = 2
_INTERPRET_TARGET_PROGRAMS = 1
# A split must cover at least this many parameters, so that writing and re-reading its partial
# [BLOCK_N, BLOCK_K] tile stays small next to its share of the reduction.
_MIN_SPLIT_P = 512


@triton.jit
def _tf32_part(x):
    """float32 x truncated to TF32's 10 explicit mantissa bits: exact as a TF32 tensor-core operand."""
    return (x.to(tl.uint32, bitcast=True) & 0xFFFFE000).to(tl.float32, bitcast=True)


@triton.jit
def _mma(acc, x, p, SPLIT: tl.constexpr, X_PARTS: tl.constexpr, SPLIT_P: tl.constexpr):
    """acc + x @ p. float64: a broadcast product summed over the reduction axis (tl.dot on float64
    is not lowered by every Triton release this library supports). float32 without SPLIT: tl.dot at
    IEEE precision (FMA). With SPLIT (GPUs with TF32 tensor cores): operands cut into parts exactly
    representable in TF32 (x = x_hi + x_lo + O(2^-21 x); one part when x came from float16 or
    bfloat16; P split only if SPLIT_P, i.e. Gaussian — Rademacher P is ±1, scaled afterwards), the
    part products summed by TF32 tensor-core dots with float32 accumulation: float32-level accuracy
    (the dropped x_lo·p_lo and residual terms are < 2^-21 relative) at tensor-core speed, inputs
    read once, no split pass through memory."""
    FP64: tl.constexpr = acc.dtype == tl.float64
    if FP64:
        acc = acc + tl.sum(x[:, :, None] * p[None, :, :], axis=1)
    elif SPLIT:
        x_hi = _tf32_part(x)
        p_hi = _tf32_part(p) if SPLIT_P else p
        if X_PARTS == 2:  # smallest terms first
            acc = tl.dot(_tf32_part(x - x_hi), p_hi, acc, input_precision="tf32")
        if SPLIT_P:
            acc = tl.dot(x_hi, _tf32_part(p - p_hi), acc, input_precision="tf32")
        acc = tl.dot(x_hi, p_hi, acc, input_precision="tf32")
    else:
        acc = tl.dot(x, p, acc, input_precision="ieee")
    return acc


@triton.jit
def _linear_x_tile(a, s, rows, row_mask, pp, p_mask, T, d_in, d_out, dw, DTYPE: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_P: tl.constexpr):
    """X[i, pp] of the per-sample Linear gradient [W.flatten(), b]: Σ_t s[i,t,o]·a[i,t,c] for the
    weight entries pp = o·d_in + c < dw, Σ_t s[i,t,pp − dw] for the bias entries (a read as 1)."""
    is_w = pp < dw
    o = tl.where(is_w, pp // d_in, pp - dw)
    c = pp % d_in
    s_mask = row_mask[:, None] & p_mask[None, :]
    a_mask = s_mask & is_w[None, :]
    s_ptr = s + rows[:, None] * T * d_out + o[None, :]  # rows is int64
    a_ptr = a + rows[:, None] * T * d_in + c[None, :]
    x = tl.zeros((BLOCK_N, BLOCK_P), DTYPE)
    for t in range(T):
        sv = tl.load(s_ptr + t * d_out, mask=s_mask, other=0.0).to(DTYPE)
        av = tl.load(a_ptr + t * d_in, mask=a_mask, other=1.0).to(DTYPE)
        x += sv * av
    return x


@triton.jit(do_not_specialize=["k0", "k1"])  # a key word equal to 1 must not become a constexpr
def _project_kernel(x, a, s, out, scale_ptr, n, p, k, chunk, num_k_tiles, T, d_in, d_out, dw,
                    k0, k1, row_offset, LINEAR: tl.constexpr, GAUSSIAN: tl.constexpr,
                    SPLIT: tl.constexpr, X_PARTS: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_P: tl.constexpr):
    PER_CALL: tl.constexpr = 2 if GAUSSIAN else 4
    BLOCK_G: tl.constexpr = BLOCK_K // PER_CALL
    scale = tl.load(scale_ptr)
    DTYPE: tl.constexpr = scale.dtype  # the compute dtype: float32, or float64 for float64 inputs
    # axis 0: output tiles, k fastest (programs that share a grads tile run together); axis 1: split
    tile = tl.program_id(0)
    pid_n = tile // num_k_tiles
    pid_k = tile % num_k_tiles
    split = tl.program_id(1).to(tl.int64)
    rows = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    row_mask = rows < n
    g = pid_k * BLOCK_G + tl.arange(0, BLOCK_G)
    j = pid_k.to(tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K).to(tl.int64)
    start = split * chunk
    end = tl.minimum(start + chunk, p)
    acc = tl.zeros((BLOCK_N, BLOCK_K), DTYPE)
    UNSCALED: tl.constexpr = SPLIT and not GAUSSIAN  # ±1 entries (exact in TF32), scaled at the end
    p_scale = scale * 0 + 1 if UNSCALED else scale  # exactly 1.0 (a GPU float division may not be)
    for p0 in range(start, end, BLOCK_P):
        pp = p0 + tl.arange(0, BLOCK_P).to(tl.int64)
        p_mask = pp < end
        if LINEAR:
            xt = _linear_x_tile(a, s, rows, row_mask, pp, p_mask, T, d_in, d_out, dw, DTYPE, BLOCK_N, BLOCK_P)
        else:
            xt = tl.load(x + rows[:, None] * p + pp[None, :], mask=row_mask[:, None] & p_mask[None, :],
                         other=0.0).to(DTYPE)
        # rows past `end` are finite P entries times X = 0: no mask needed on the P tile
        acc = _mma(acc, xt, p_tile(row_offset + pp, g, k0, k1, p_scale, GAUSSIAN, BLOCK_P, BLOCK_G),
                   SPLIT, X_PARTS, GAUSSIAN)
    if UNSCALED:
        acc = acc * scale
    mask = row_mask[:, None] & (j[None, :] < k)
    tl.store(out + split * n * k + rows[:, None] * k + j[None, :], acc, mask=mask)


def _config(n: int, k: int, dtype: torch.dtype, device: torch.device) -> tuple[int, int, int, int]:
    """(BLOCK_N, BLOCK_K, BLOCK_P, num_warps) for this problem."""
    if device.type != "cuda":
        caps = _INTERPRET_CONFIG
    else:
        caps = _GPU_CONFIG_FP64 if dtype == torch.float64 else _GPU_CONFIG
    bn = min(caps[0], max(16, triton.next_power_of_2(n)))
    bk = min(caps[1], max(16, triton.next_power_of_2(k)))
    bp = caps[2]
    if dtype == torch.float64:  # the [BLOCK_N, BLOCK_P, BLOCK_K] product must be one Triton tensor
        bn, bk, bp = fit_float64_tile(bn, bk, bp)
    return bn, bk, bp, caps[3]


# TF32 tensor-core split (see _mma): None = wherever the GPU has TF32 tensor cores (sm_80+) and the
# compute dtype is float32; True/False force it (tests run the split arithmetic in the interpreter).
TF32_SPLIT = None  # None, True or False (a bool | None annotation needs Python 3.10 here)


def _tf32_split(compute: torch.dtype, device: torch.device) -> bool:
    if compute != torch.float32:
        return False
    if TF32_SPLIT is not None:
        return TF32_SPLIT
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 8


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _target_programs(device: torch.device) -> int:
    if device.type != "cuda":
        return _INTERPRET_TARGET_PROGRAMS
    return _PROGRAMS_PER_SM * _sm_count(device.index if device.index is not None else torch.cuda.current_device())


def _split(tiles: int, p: int, block_p: int, device: torch.device) -> tuple[int, int]:
    """(SPLIT, chunk): SPLIT chunks of ``chunk`` parameters (a multiple of BLOCK_P) covering p,
    enough that tiles · SPLIT reaches the target program count; 1 when the tiles already do."""
    target = _target_programs(device)
    split = 1 if tiles >= target else max(1, min(triton.cdiv(target, tiles), triton.cdiv(p, _MIN_SPLIT_P)))
    chunk = triton.cdiv(triton.cdiv(p, split), block_p) * block_p
    return triton.cdiv(p, chunk), chunk


def _launch(x, a, s, n, p, k, seed, kind, row_offset, linear, T=1, d_in=1, d_out=1, dw=0):
    dtype = x.dtype
    device = x.device
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    if n == 0 or p == 0:
        return torch.zeros(n, k, dtype=compute, device=device)
    bn, bk, bp, num_warps = _config(n, k, dtype, device)
    num_k_tiles = triton.cdiv(k, bk)
    tiles = triton.cdiv(n, bn) * num_k_tiles
    split, chunk = _split(tiles, p, bp, device)
    buf = torch.empty((split, n, k), dtype=compute, device=device)
    scale = torch.full((1,), 1.0 / math.sqrt(k), dtype=compute, device=device)  # rounded once, as elsewhere
    _project_kernel[(tiles, split)](
        x, a, s, buf, scale, n, p, k, chunk, num_k_tiles, T, d_in, d_out, dw,
        seed & 0xFFFFFFFF, seed >> 32, row_offset, LINEAR=linear, GAUSSIAN=kind == "gaussian",
        SPLIT=_tf32_split(compute, device),
        X_PARTS=1 if not linear and dtype in (torch.float16, torch.bfloat16) else 2,  # half values fit TF32
        BLOCK_N=bn, BLOCK_K=bk, BLOCK_P=bp, num_warps=num_warps)
    return buf[0] if split == 1 else buf.sum(0)  # fixed-order reduction over the splits


def project(grads: torch.Tensor, k: int, seed: int, kind: str, row_offset: int) -> torch.Tensor:
    """grads @ P[row_offset : row_offset + p, :k] for contiguous grads [n, p] (float32/16, bfloat16,
    float64); [n, k] float32 (float64 for float64 grads)."""
    n, p = grads.shape
    return _launch(grads, grads, grads, n, p, k, seed, kind, row_offset, linear=False)


def project_linear(a3: torch.Tensor, s3: torch.Tensor, k: int, seed: int, kind: str, row_offset: int,
                   bias: bool) -> torch.Tensor:
    """:func:`project` of the per-sample Linear gradient [W.flatten(), b] (W = Σ_t s_t a_tᵀ,
    b = Σ_t s_t) from contiguous a3 [n, T, d_in] and s3 [n, T, d_out], never materialized."""
    n, T, d_in = a3.shape
    d_out = s3.shape[2]
    dw = d_out * d_in
    p = dw + (d_out if bias else 0)
    if T == 0:  # no positions: a zero gradient (and empty tensors, whose pointers a GPU launch rejects)
        p = 0
    # x is unused here; d_in = 0 leaves only bias rows: a is never read (s stands in for its empty
    # storage), and d_in = 1 keeps the unused pp // d_in well defined
    return _launch(s3, a3 if d_in else s3, s3, n, p, k, seed, kind, row_offset, linear=True, T=T,
                   d_in=max(d_in, 1), d_out=d_out, dw=dw)
