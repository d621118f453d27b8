"""Random projection of per-sample gradients (MATH.md §9): φ_i = Pᵀ g_i with P generated on the fly.

Three entry points share one P (``projection_matrix``'s, so they agree to rounding):

- :func:`project`: dense gradients ``grads [n, p]`` → ``[n, k]``;
- :func:`project_linear`: one Linear/Conv layer from its inputs ``a`` and output gradients ``s``,
  the per-sample weight gradient Σ_t s_t a_tᵀ never formed whole;
- ``project_model`` (in ``fimoda_kernels.projection``): a model, capture + materialized leftovers.

Parameter indices of a layer (the rows of P it uses) follow ``model.named_parameters()``:
weight entry (o, c) → ``row_offset + o·d_in + c`` (row-major), bias entry o →
``row_offset + d_out·d_in + o``; so projecting a whole model layer by layer equals projecting its
flattened per-sample gradient.
"""
from __future__ import annotations

import math

import torch

from .._dispatch import op
from .._validate import FLOAT_DTYPES, all_finite, check_choice, check_input, check_int, check_layer_pair, check_seed
from .projection_matrix import (_projection_cpu, _projection_matrix_reference, check_row_offset,
                                projection_matrix)

KINDS = ("rademacher", "gaussian")
LINEAR_KINDS = KINDS + ("kronecker",)
_TILE_BYTES = 16 * 2**20  # P tile of the cpu path (16 MiB: 2–7% faster than 32 MiB at n = 256)
_COL_BLOCK = 2048  # P columns per GEMM of the cpu path (see _chunked)

_PROJECT = op("project")
_PROJECT_LINEAR = op("project_linear")


def _out_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_common(k, seed, kind, row_offset, p, kinds):
    k = check_int("k", k, min_value=1, max_value=2**32 - 1)
    seed = check_seed("seed", seed)
    kind = check_choice("kind", kind, kinds)
    row_offset = check_row_offset(row_offset, p)
    return k, seed, kind, row_offset


def _check_finite(out: torch.Tensor, what: str, *inputs: torch.Tensor) -> torch.Tensor:
    if not all_finite(out):
        if all(all_finite(t) for t in inputs):
            raise ValueError(f"{what}: the projection of these finite inputs overflows {out.dtype} (largest "
                             f"|entry| {max(float(t.abs().max()) for t in inputs if t.numel()):.3g}); scale them down")
        raise ValueError(f"{what}: expected finite values, got NaN or Inf (the projection is not finite)")
    return out


# ----------------------------------------------------------------------------- project

def _project_reference(grads: torch.Tensor, k: int, seed: int, kind: str = "rademacher",
                       row_offset: int = 0) -> torch.Tensor:
    """float64 grads @ P with P from the pure-torch generator, in row blocks of P."""
    n, p = grads.shape
    out = torch.zeros(n, k, dtype=torch.float64, device=grads.device)
    if n == 0:  # no P to build (k may be 2^32 − 1)
        return out
    block = max(1, 2**22 // k)
    for p0 in range(0, p, block):
        P = _projection_matrix_reference(min(block, p - p0), k, seed, kind, row_offset + p0,
                                         torch.float64, grads.device)
        out += grads[:, p0:p0 + P.shape[0]].double() @ P
    return out


def project(grads: torch.Tensor, k: int, seed: int, kind: str = "rademacher", row_offset: int = 0,
            backend: str | None = None) -> torch.Tensor:
    """Project per-sample gradients: ``grads @ P[row_offset : row_offset + p]`` (MATH.md §9).

    Args:
        grads: ``[n, p]`` float32, float16, bfloat16 (or float64) gradients, one row per sample.
        k: projection dimension (any k >= 1). seed: integer in [0, 2^64).
        kind: "rademacher" or "gaussian" (entries as in :func:`projection_matrix`).
        row_offset: global parameter index of column 0 of ``grads`` (64-bit).
        backend: "cuda", "triton", "cpu", "torch" or None.

    Returns:
        ``[n, k]`` float32 (float64 for float64 grads), accumulated in float32 (float64).

    P is generated tile by tile, never whole: cpu generates ``[≈16 MiB / (4k'), k']`` tiles
    (k' = min(k, 2048) columns at a time) with the native Philox kernel and multiplies them with
    torch's GEMM (``addmm``), the gradient block converted to float32 as it goes. (Measured on the
    tile step, 2-core AVX-512: a native AVX-512 rank-update kernel with 4×32 register blocks reached
    48–71 GFLOP/s, torch's addmm 218–289, so the GEMM stays torch's.) Peak extra memory ≈ n·k·4 +
    16 MiB (+ n·16 MiB/(4k')·4 for half inputs). cuda on sm_80+ multiplies on tensor cores over split bfloat16 operands (float32
    accuracy; see the GPU-backends section below), peak extra memory ≈ 2·n·k·4 bytes + at most
    ~0.9 GiB of tiles and accumulators. Non-finite results raise ``ValueError``.
    """
    check_input("grads", grads, ndim=2, dtypes=FLOAT_DTYPES)
    n, p = grads.shape
    k, seed, kind, row_offset = _check_common(k, seed, kind, row_offset, p, KINDS)
    impl = _PROJECT.select(backend, grads.device, grads, k)
    return _check_finite(impl.fn(grads, k, seed, kind, row_offset), "grads", grads)


@_PROJECT.register("torch")
def _project_torch(grads, k, seed, kind, row_offset):
    return _project_reference(grads, k, seed, kind, row_offset).to(_out_dtype(grads.dtype))


def _chunked(blocks, n, k, seed, kind, dtype, device):
    """Σ over (row_offset, X) blocks of X @ P[row_offset : row_offset + X.shape[1]], P tiles generated
    by the native cpu kernel into one reused buffer (no allocation or page faults per tile): the
    shared engine of the cpu path. Blocks hold at most ``_tile_rows(k)`` columns (bias blocks:
    d_out). Wider than ``_COL_BLOCK``, P is generated and multiplied in column blocks: each GEMM then
    updates an [n, 2048] slice of the output (L2-sized at n = 256) with a deeper inner dimension,
    instead of streaming all of ``out`` per thin tile (n = 256, p = 1e5, k = 8192: ~8% faster, A/B)."""
    out = torch.zeros(n, k, dtype=dtype, device=device)
    kc = min(k, _COL_BLOCK)
    tile = None
    for offset, X in blocks:
        rows = X.shape[1]
        if rows == 0:  # e.g. the bias block of a layer without outputs
            continue
        if tile is None or tile.numel() < rows * kc:
            tile = torch.empty(rows * kc, dtype=dtype, device=device)
        X = X.to(dtype)
        for j0 in range(0, k, kc):
            P = tile[:rows * min(kc, k - j0)].view(rows, -1)
            _projection_cpu(P, seed, kind, offset, col_begin=j0, k=k)
            out[:, j0:j0 + P.shape[1]].addmm_(X, P)
    return out


def _tile_rows(k: int) -> int:
    return max(1, _TILE_BYTES // (4 * min(k, _COL_BLOCK)))


@_PROJECT.register("cpu")
def _project_cpu(grads, k, seed, kind, row_offset):
    n, p = grads.shape
    step = _tile_rows(k)
    blocks = ((row_offset + p0, grads[:, p0:p0 + step]) for p0 in range(0, p, step))
    return _chunked(blocks, n, k, seed, kind, _out_dtype(grads.dtype), grads.device)


# ----------------------------------------------------------------------------- project_linear

_KRONECKER_OUT_SEED = 0x9E3779B97F4A7C15  # xor-ed into the seed of the output-side factor


def kronecker_dims(k: int) -> tuple[int, int]:
    """(k_out, k_in) of the Kronecker projection: k_out the largest divisor of k with k_out <= √k."""
    k_out = math.isqrt(k)
    while k % k_out:
        k_out -= 1
    return k_out, k // k_out


def _linear_grads_reference(a: torch.Tensor, s: torch.Tensor, bias: bool) -> torch.Tensor:
    """Materialized per-sample weight(+bias) gradients [n, d_out·d_in (+ d_out)] in float64."""
    G = torch.einsum("nto,ntc->noc", s.double(), a.double()).flatten(1)
    return torch.cat([G, s.double().sum(1)], 1) if bias else G


def _project_linear_reference(a: torch.Tensor, s: torch.Tensor, k: int, seed: int,
                              kind: str = "rademacher", row_offset: int = 0,
                              bias: bool = True) -> torch.Tensor:
    """Materialize Σ_t s_t a_tᵀ (and Σ_t s_t), then :func:`_project_reference`; a, s are 3-D."""
    return _project_reference(_linear_grads_reference(a, s, bias), k, seed, kind, row_offset)


def project_linear(a: torch.Tensor, s: torch.Tensor, k: int, seed: int, row_offset: int = 0,
                   bias: bool = True, kind: str = "rademacher",
                   backend: str | None = None) -> torch.Tensor:
    """Project each sample's Linear-layer gradient without forming it (MATH.md §4, §9).

    Args:
        a: layer inputs ``[n, d_in]`` (T = 1) or ``[n, T, d_in]`` (sequence positions, conv patches),
            *without* a column of ones for the bias.
        s: output gradients ``[n, d_out]`` or ``[n, T, d_out]`` (same n, T, dtype and device as ``a``).
        k, seed: as in :func:`project`. row_offset: parameter index of the weight's entry (0, 0).
        bias: include the bias gradient Σ_t s_t (parameter indices after the weight's).
        kind: "rademacher" / "gaussian" — exactly ``project`` of the flattened gradient
            ``[W.flatten(), b]`` with the same seed and offset; or "kronecker": LoGra-style
            P = P_out ⊗ P_in (Rademacher factors, (k_out, k_in) = :func:`kronecker_dims`, P_in on
            rows ``row_offset ..`` with ``seed``, P_out with ``seed ^ 0x9E3779B97F4A7C15``), acting
            on the ``[d_out, d_in(+1)]`` gradient matrix with the bias as last column:
            φ_i = vec(Σ_t (P_outᵀ s_t)(P_inᵀ [a_t, 1])ᵀ). A different, much cheaper estimator
            (O(T(d_in·k_in + d_out·k_out) + T·k) per sample), unbiased for inner products, but not
            equal to the dense projection.
        backend: "cuda", "triton", "cpu", "torch" or None.

    Returns:
        ``[n, k]`` float32 (float64 for float64 inputs).

    The cpu path builds the outer products s_o·a_c for a block of output rows o at a time
    (≤ 16 MiB) and multiplies by the matching tile of P with torch's GEMM.
    """
    a3, s3 = check_layer_pair(a, s)
    if not isinstance(bias, bool):
        raise TypeError(f"bias: expected a bool, got {type(bias).__name__}")
    d_in, d_out = a3.shape[2], s3.shape[2]
    p = d_out * d_in + (d_out if bias else 0)
    k, seed, kind, row_offset = _check_common(k, seed, kind, row_offset, p, LINEAR_KINDS)
    if kind == "kronecker":
        out = _project_linear_kronecker(a3, s3, k, seed, row_offset, bias, backend)
    else:
        impl = _PROJECT_LINEAR.select(backend, a.device, a3, s3, k)
        out = impl.fn(a3, s3, k, seed, kind, row_offset, bias)
    return _check_finite(out, "a, s", a3, s3)


def _project_linear_kronecker(a3, s3, k, seed, row_offset, bias, backend):
    dtype = _out_dtype(a3.dtype)
    k_out, k_in = kronecker_dims(k)
    if bias:
        a3 = torch.cat([a3, a3.new_ones(a3.shape[:2] + (1,))], 2)
    P_in = projection_matrix(a3.shape[2], k_in, seed, "rademacher", row_offset, dtype=dtype,
                             device=a3.device, backend=backend)
    P_out = projection_matrix(s3.shape[2], k_out, seed ^ _KRONECKER_OUT_SEED, "rademacher", row_offset,
                              dtype=dtype, device=a3.device, backend=backend)
    return torch.einsum("nto,nti->noi", s3.to(dtype) @ P_out, a3.to(dtype) @ P_in).flatten(1)


@_PROJECT_LINEAR.register("torch")
def _project_linear_torch(a3, s3, k, seed, kind, row_offset, bias):
    return _project_linear_reference(a3, s3, k, seed, kind, row_offset, bias).to(_out_dtype(a3.dtype))


@_PROJECT_LINEAR.register("cpu")
def _project_linear_cpu(a3, s3, k, seed, kind, row_offset, bias):
    n, _, d_in = a3.shape
    d_out = s3.shape[2]
    dtype = _out_dtype(a3.dtype)
    a3, s3 = a3.to(dtype), s3.to(dtype)
    if n == 0:
        return torch.zeros(0, k, dtype=dtype, device=a3.device)
    rows = max(1, _TILE_BYTES // (4 * max(d_in, 1) * max(min(k, _COL_BLOCK), n)))  # output rows o per block

    def blocks():
        for o0 in range(0, d_out, rows):
            X = torch.einsum("nto,ntc->noc", s3[:, :, o0:o0 + rows], a3).reshape(n, -1)
            yield row_offset + o0 * d_in, X
        if bias:
            yield row_offset + d_out * d_in, s3.sum(1)

    return _chunked(blocks(), n, k, seed, kind, dtype, a3.device)


# ----------------------------------------------------------------------------- GPU backends
# Kernels: fimoda_kernels/triton/project.py and csrc/cuda/project.cu (bound in python/src/project.cpp).
# Native kernels take raw pointers, a dtype code and the current stream; they write float32
# (float64 for float64 inputs) and accumulate in that type.

_DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}
_KIND_CODE = {"rademacher": 0, "gaussian": 1}


@_PROJECT.register("triton")
def _project_triton(grads, k, seed, kind, row_offset):
    from ..triton.project import project as kernel

    return kernel(grads.contiguous(), k, seed, kind, row_offset)


@_PROJECT_LINEAR.register("triton")
def _project_linear_triton(a3, s3, k, seed, kind, row_offset, bias):
    from ..triton.project import project_linear as kernel

    return kernel(a3.contiguous(), s3.contiguous(), k, seed, kind, row_offset, bias)


# The cuda backend multiplies on tensor cores where it can (sm_80+, float32/16 and bfloat16 inputs):
# P is generated unscaled tile by tile into a reused buffer by the Philox kernel (Rademacher ±1
# directly as bfloat16, exact; Gaussian in float32), operands are split into bfloat16 parts
# (csrc/cuda/project.cu split_bf16: float32 → 3 parts, float16 → 2, bfloat16 → itself; a Gaussian P
# tile → 3), and the products of the parts are summed by cuBLAS bfloat16 GEMMs with float32
# accumulation (torch.addmm(out_dtype=float32)), keeping the pairs whose weight reaches 2^-24: the
# result matches float32 arithmetic, not TF32. Measured on an H200 (benchmarks/RESULTS.md): the fused
# shared-memory FMA kernel (project_gemm_kernel) reached ~25 TFLOP/s, half the float32 GEMM peak,
# Philox-bound; it stays for float64 and older GPUs.
_MMA_TILE_BYTES = 64 * 2**20    # bfloat16 P parts per tile
_MMA_SPLIT_BYTES = 256 * 2**20  # bfloat16 operand parts per tile
_MMA_STACK_BYTES = 512 * 2**20  # float32 accumulators of the stacked form (else one GEMM per part pair)
_X_PARTS = {torch.float32: 3, torch.float16: 2, torch.bfloat16: 1}
_TENSOR_CORES: dict = {}        # device index -> whether addmm(out_dtype=float32) runs there
USE_TENSOR_CORES = True         # False: the fused FMA kernel everywhere (benchmarks compare both)


def _tensor_cores(device: torch.device) -> bool:
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _TENSOR_CORES:
        ok = torch.cuda.get_device_capability(index) >= (8, 0)
        if ok:
            try:  # float32 accumulation of bfloat16 products (torch >= 2.8 on CUDA)
                x = torch.ones(2, 2, dtype=torch.bfloat16, device=device)
                out = torch.addmm(torch.zeros(2, 2, device=device), x, x, out_dtype=torch.float32)
                ok = out.dtype == torch.float32
            except (RuntimeError, TypeError):
                ok = False
        _TENSOR_CORES[index] = ok
    return USE_TENSOR_CORES and _TENSOR_CORES[index]


class _MMAPrimitives:
    """The three device steps of the tensor-core path; tests substitute CPU emulations to check the
    tiling around them (offsets, block widths, parts) without a GPU."""

    @staticmethod
    def fill(P: torch.Tensor, seed: int, kind: str, row_offset: int) -> None:
        """P [rows, k] contiguous ← unscaled P[row_offset : row_offset + rows] (±1 / N(0, 1)): float32,
        or bfloat16 for Rademacher (±1 exact; written directly, no float32 tile to convert)."""
        from .._dispatch import cuda_stream
        from .._ext import _C

        if P.dtype == torch.bfloat16:
            if kind != "rademacher":
                raise ValueError(f"kind: a bfloat16 P tile holds Rademacher entries only, got {kind!r}")
            _C.rademacher_bf16_cuda(P.data_ptr(), P.shape[0], P.shape[1], seed, row_offset, cuda_stream(P.device))
            return
        _C.projection_matrix_cuda(P.data_ptr(), False, P.shape[0], P.shape[1], seed, _KIND_CODE[kind], row_offset,
                                  1.0, cuda_stream(P.device))

    @staticmethod
    def split(x: torch.Tensor, parts: int, out: torch.Tensor) -> None:
        """out [parts, rows, cols] bfloat16 ← the parts of the float32/float16 x (unit column stride)."""
        from .._dispatch import cuda_stream
        from .._ext import _C

        rows, cols = x.shape
        ld = x.stride(0) if rows > 1 else cols  # a single row may carry any stride(0)
        _C.split_bf16_cuda(x.data_ptr(), _DTYPE_CODE[x.dtype], rows, cols, ld, out.data_ptr(), parts,
                           cuda_stream(x.device))

    @staticmethod
    def addmm(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """out + a @ b for bfloat16 a, b, accumulated and returned in float32."""
        return torch.addmm(out, a, b, out_dtype=torch.float32)


def _split(x: torch.Tensor, parts: int, buf: torch.Tensor, prims) -> torch.Tensor:
    """The bfloat16 parts of x [rows, cols] in buf, as one contiguous [parts, rows, cols] tensor."""
    rows, cols = x.shape
    out = buf[:parts * rows * cols].view(parts, rows, cols)
    prims.split(x, parts, out)
    return out


def _mma_tile_rows(n: int, k: int, x_parts: int, p_parts: int) -> int:
    """P-tile rows under both byte budgets, a multiple of 64 (aligned cuBLAS operands), at least 64."""
    rows = min(_MMA_TILE_BYTES // (2 * k * p_parts), _MMA_SPLIT_BYTES // (2 * max(n, 1) * x_parts))
    return max(64, rows // 64 * 64)


def _columns(blocks, width: int):
    """(offset, X) blocks cut into column chunks of at most ``width`` (P rows follow the columns)."""
    for offset, X in blocks:
        for c0 in range(0, X.shape[1], width):
            yield offset + c0, X[:, c0:c0 + width]


def _project_blocks_mma(blocks, n, k, seed, kind, dtype, device, tile_rows, prims=_MMAPrimitives):
    """Σ over (row_offset, X [n, r ≤ tile_rows], X's dtype = dtype, unit column stride) blocks of
    X @ P[row_offset : row_offset + r] on tensor cores (see above). The X parts lie stacked as one
    [x_parts·n, r] matrix, so each P part costs one GEMM over all the X parts it pairs with (rather than
    one GEMM per pair, each reading the P tile again with a third of the rows); their row blocks are
    summed once at the end, while those accumulators, (Σ_j m_j + max_j m_j + 1)·n·k·4 bytes (m_j = X parts
    paired with P part j: Rademacher x_parts, Gaussian float32 3, 2, 1), fit _MMA_STACK_BYTES; larger
    n·k (where the GEMMs are big anyway) take one GEMM per pair into one accumulator, 2·n·k·4. Plus
    tile_rows·k·2·p_parts (+ tile_rows·k·4 for Gaussian) + 2·n·tile_rows·x_parts bytes."""
    x_parts, p_parts = _X_PARTS[dtype], 1 if kind == "rademacher" else 3
    used = [min(x_parts, 3 - j) for j in range(p_parts)]  # pairs i + j < 3: the others weigh <= 2^-24
    if (sum(used) + max(used)) * n * k * 4 > _MMA_STACK_BYTES:  # large n·k: one pair per GEMM, 2·n·k·4
        pairs = [(i, j) for i in range(x_parts) for j in range(p_parts) if i + j < 3]
    else:
        pairs = None
    acc = [torch.zeros(m * n, k, dtype=torch.float32, device=device) for m in (used if pairs is None else [1])]
    # Rademacher: the bfloat16 ±1 tile is filled directly; Gaussian: a float32 tile, then split
    tile = torch.empty(0 if p_parts == 1 else tile_rows * k, dtype=torch.float32, device=device)
    p_buf = torch.empty(p_parts * tile_rows * k, dtype=torch.bfloat16, device=device)
    x_buf = torch.empty(0 if x_parts == 1 else x_parts * n * tile_rows, dtype=torch.bfloat16, device=device)
    for offset, X in blocks:
        rows = X.shape[1]
        if rows > tile_rows:  # the Philox kernel would write past the tile
            raise RuntimeError(f"project (cuda): a block of {rows} columns exceeds the {tile_rows}-row P tile")
        if p_parts == 1:
            Ps = p_buf[:rows * k].view(1, rows, k)
            prims.fill(Ps[0], seed, kind, offset)
        else:
            P = tile[:rows * k].view(rows, k)
            prims.fill(P, seed, kind, offset)
            Ps = _split(P, p_parts, p_buf, prims)
        Xs = X if x_parts == 1 else _split(X, x_parts, x_buf, prims).view(x_parts * n, rows)
        if pairs is None:
            for j, m in enumerate(used):
                acc[j] = prims.addmm(acc[j], Xs[:m * n], Ps[j])
        else:
            for i, j in pairs:
                acc[0] = prims.addmm(acc[0], Xs[i * n:(i + 1) * n], Ps[j])
    if pairs is not None:
        return acc[0].mul_(1.0 / math.sqrt(k))
    out = torch.zeros(n, k, dtype=torch.float32, device=device)
    for i in reversed(range(x_parts)):  # smallest terms first
        for j in reversed(range(p_parts)):
            if i < used[j]:
                out += acc[j][i * n:(i + 1) * n]
    return out.mul_(1.0 / math.sqrt(k))


def _project_mma(g, k, seed, kind, row_offset, prims=_MMAPrimitives):
    n, p = g.shape
    step = _mma_tile_rows(n, k, _X_PARTS[g.dtype], 1 if kind == "rademacher" else 3)
    blocks = ((row_offset + p0, g[:, p0:p0 + step]) for p0 in range(0, p, step))
    return _project_blocks_mma(blocks, n, k, seed, kind, g.dtype, g.device, min(step, max(p, 1)), prims)


@_PROJECT.register("cuda")
def _project_cuda(grads, k, seed, kind, row_offset):
    from .._dispatch import cuda_stream
    from .._ext import _C

    g = grads.contiguous()
    n, p = g.shape
    if g.dtype != torch.float64 and n > 0 and _tensor_cores(g.device):
        return _project_mma(g, k, seed, kind, row_offset)
    out = torch.empty(n, k, dtype=_out_dtype(g.dtype), device=g.device)
    _C.project_cuda(g.data_ptr(), _DTYPE_CODE[g.dtype], out.data_ptr(), n, p, k, seed, _KIND_CODE[kind],
                    row_offset, 1.0 / math.sqrt(k), cuda_stream(g.device))
    return out


@_PROJECT_LINEAR.register("cuda")
def _project_linear_cuda(a3, s3, k, seed, kind, row_offset, bias):
    from .._dispatch import cuda_stream
    from .._ext import _C

    a3, s3 = a3.contiguous(), s3.contiguous()
    n, T, d_in = a3.shape
    d_out = s3.shape[2]
    if a3.dtype != torch.float64 and n > 0 and d_in > 0 and _tensor_cores(a3.device):
        return _project_linear_mma(a3, s3, k, seed, kind, row_offset, bias)
    out = torch.empty(n, k, dtype=_out_dtype(a3.dtype), device=a3.device)
    _C.project_linear_cuda(a3.data_ptr(), s3.data_ptr(), _DTYPE_CODE[a3.dtype], out.data_ptr(), n, T, d_in,
                           d_out, bias, k, seed, _KIND_CODE[kind], row_offset, 1.0 / math.sqrt(k),
                           cuda_stream(a3.device))
    return out


def _project_linear_mma(a3, s3, k, seed, kind, row_offset, bias, prims=_MMAPrimitives):
    """project_linear on tensor cores: the weight gradient formed in float32 a few output rows at a
    time ([n, rows·d_in]: s_o·a_c products, or for T > 1 a bmm over t with TF32 off), never whole,
    cut into column chunks of at most one P tile (also the bias block), then multiplied as in
    _project_blocks_mma (float32 operands, 3 parts)."""
    n, T, d_in = a3.shape
    d_out = s3.shape[2]
    step = _mma_tile_rows(n, k, 3, 1 if kind == "rademacher" else 3)
    outs = max(1, step // d_in)  # output rows per block
    a32, s32 = a3.float(), s3.float()

    def blocks():
        for o0 in range(0, d_out, outs):
            o1 = min(d_out, o0 + outs)
            if T == 1:
                X = (s32[:, 0, o0:o1, None] * a32[:, 0, None, :]).reshape(n, -1)
            else:
                with _ieee_fp32():
                    X = torch.bmm(s32[:, :, o0:o1].transpose(1, 2), a32).reshape(n, -1)
            yield row_offset + o0 * d_in, X
        if bias:
            yield row_offset + d_out * d_in, s32.sum(1)

    width = min(step, max(outs * d_in, d_out if bias else 0))
    return _project_blocks_mma(_columns(blocks(), width), n, k, seed, kind, torch.float32, a3.device, width,
                               prims)


class _ieee_fp32:
    """No TF32 in float32 matmuls inside: through ``fp32_precision`` where torch has it (reading the
    legacy ``allow_tf32`` raises once a caller used the new API), else ``allow_tf32``. The setting is
    process-global while inside."""

    def __enter__(self):
        m = torch.backends.cuda.matmul
        self.attr, value = ("fp32_precision", "ieee") if hasattr(m, "fp32_precision") else ("allow_tf32", False)
        self.saved = getattr(m, self.attr)
        setattr(m, self.attr, value)

    def __exit__(self, *exc):
        setattr(torch.backends.cuda.matmul, self.attr, self.saved)
