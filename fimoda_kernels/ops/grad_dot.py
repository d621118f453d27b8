"""Gradient inner products (MATH.md §3 Grad-Dot / Grad-Cos, §4 the factored "ghost" form).

- :func:`grad_dot`: dense ``train [n, d] · test [m, d]ᵀ`` (full or projected gradients), optional
  cosine normalization, optional streaming top-k over the training set;
- :func:`grad_dot_factored`: Σ_layers ⟨S_iᵀA_i, S_jᵀA_j⟩_F from each Linear/Conv layer's inputs a
  and output gradients s, never forming a per-sample gradient.

Grad-Cos zero-norm rule: a pair in which either gradient has norm 0 scores 0 (not NaN).
"""
from __future__ import annotations

import torch

from .._dispatch import op
from .._validate import FLOAT_DTYPES, all_finite, check_input, check_int, check_layer_entry

_CHUNK_BYTES = 16 * 2**20  # working set of the chunked cpu paths (output rows, temporaries)

_GRAD_DOT = op("grad_dot")
_GRAD_DOT_FACTORED = op("grad_dot_factored")


def _out_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _inv_norms(sq: torch.Tensor) -> torch.Tensor:
    """1/‖g‖ from squared norms, 0 where the norm is 0 (the Grad-Cos zero-norm rule); a non-finite
    squared norm is an error, not a zero cosine."""
    if not all_finite(sq):  # NaN > 0 is False: it would pass as a zero norm
        raise ValueError("normalize: a gradient's squared norm is not finite (NaN or Inf), so its cosines are "
                         "undefined; check the gradients' range")
    inv = sq.rsqrt()
    return torch.where(sq > 0, inv, torch.zeros_like(inv))


def cosine_normalize_(scores: torch.Tensor, sq_train: torch.Tensor, sq_test: torch.Tensor) -> torch.Tensor:
    """In place: scores[i, j] /= ‖train_i‖ ‖test_j‖ given squared norms (0 for a zero norm)."""
    return scores.mul_(_inv_norms(sq_train.to(scores.dtype))[:, None]).mul_(_inv_norms(sq_test.to(scores.dtype)))


def _out_of_range(x: torch.Tensor) -> bool:
    """Whether a non-zero row's squared norm leaves [1e-30, 1e30] in float32 (one fused reduction;
    rows of exact zeros, whose cosines are 0 either way, do not count)."""
    if x.numel() == 0:
        return False
    sq = torch.linalg.vector_norm(x, dim=1, dtype=torch.float32) ** 2
    if bool(((sq > 1e30) | ~torch.isfinite(sq) | ((sq > 0) & (sq < 1e-30))).any()):
        return True
    zero = sq == 0  # underflowed, or truly zero: only the few such rows are looked at again
    return bool(zero.any()) and bool(x[zero].any())


def _unit_rows(x: torch.Tensor) -> torch.Tensor:
    """Rows scaled to unit norm in float64 (zero rows stay zero), then float32 (the kernels' compute
    dtype: rounding unit rows to float16/bfloat16 would cost their cosines ~1e-3)."""
    n = torch.linalg.vector_norm(x, dim=1, dtype=torch.float64)
    return (x.double() * torch.where(n > 0, 1 / n, torch.zeros_like(n))[:, None]).to(_out_dtype(x.dtype))


def _check_finite(out: torch.Tensor, what: str) -> torch.Tensor:
    if not all_finite(out):
        raise ValueError(f"{what}: expected finite values, got NaN or Inf (the scores are not finite)")
    return out


# ----------------------------------------------------------------------------- dense

def _grad_dot_reference(train: torch.Tensor, test: torch.Tensor, normalize: bool = False) -> torch.Tensor:
    """float64 train @ testᵀ, divided by the norms when ``normalize`` (zero-norm pairs → 0)."""
    tr, te = train.double(), test.double()
    out = tr @ te.T
    if normalize:
        cosine_normalize_(out, (tr * tr).sum(1), (te * te).sum(1))
    return out


def grad_dot(train: torch.Tensor, test: torch.Tensor, normalize: bool = False, topk: int | None = None,
             backend: str | None = None):
    """Grad-Dot (``normalize=False``) or Grad-Cos scores of every (train, test) pair.

    Args:
        train: ``[n, d]`` gradients (float32/16/bf16/64), one row per training point.
        test: ``[m, d]`` gradients, same dtype and device.
        normalize: divide by ‖train_i‖‖test_j‖ (norms computed from the same inputs); a zero
            norm gives score 0. Rows too small or large for float32 squares (norms outside about
            [1e-15, 1e15]) are normalized first, in float64, on every backend.
        topk: None for the full ``[n, m]`` matrix; K to stream over ``train`` in chunks and return
            ``(values [m, K], indices [m, K])``: per test point the K largest scores, descending,
            indices into ``train`` — memory O(chunk·m + K·m), never n × m.
        backend: "cuda", "triton", "cpu", "torch" or None.

    Returns:
        ``[n, m]`` float32 (float64 for float64 inputs), or the top-k pair.

    cpu: torch's GEMM (the machine's BLAS) into the output, then one scaling pass for Grad-Cos
    (O(n·m) against the GEMM's O(n·m·d)); measured at 111% of the square-GEMM peak for
    8192 × 512 × 2048 (benchmarks/RESULTS.md), so no native epilogue kernel was written.
    """
    check_input("train", train, ndim=2, dtypes=FLOAT_DTYPES)
    check_input("test", test, ndim=2, dtypes=(train.dtype,), device=train.device)
    if train.shape[1] != test.shape[1]:
        raise ValueError(f"test: expected [m, {train.shape[1]}] (train's d), got {tuple(test.shape)}")
    if not isinstance(normalize, bool):
        raise TypeError(f"normalize: expected a bool, got {type(normalize).__name__}")
    impl = _GRAD_DOT.select(backend, train.device, train, test)
    if normalize and train.dtype != torch.float64 and (_out_of_range(train) or _out_of_range(test)):
        # squares or products of these rows leave float32's range (every backend squares in float32):
        # the cosines of rows normalized first, in float64
        train, test, normalize = _unit_rows(train), _unit_rows(test), False
    if topk is None:
        return _check_finite(impl.fn(train, test, normalize), "train, test")
    topk = check_int("topk", topk, min_value=1, max_value=max(1, train.shape[0]))
    rows = max(1, _CHUNK_BYTES // (4 * max(1, test.shape[0])))
    best_v = best_i = None
    for i0 in range(0, train.shape[0], rows):
        block = _check_finite(impl.fn(train[i0:i0 + rows], test, normalize), "train, test").T  # [m, c]
        idx = torch.arange(i0, i0 + block.shape[1], device=block.device).expand_as(block)
        if best_v is not None:
            block, idx = torch.cat([best_v, block], 1), torch.cat([best_i, idx], 1)
        best_v, pos = block.topk(min(topk, block.shape[1]), dim=1)
        best_i = idx.gather(1, pos)
    if best_v is None:  # no training rows: nothing to rank
        best_v = _check_finite(impl.fn(train, test, normalize), "train, test").T
        best_i = torch.empty(best_v.shape, dtype=torch.int64, device=best_v.device)
    return best_v, best_i


@_GRAD_DOT.register("torch")
def _grad_dot_torch(train, test, normalize):
    return _grad_dot_reference(train, test, normalize).to(_out_dtype(train.dtype))


def _sq_norms(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return torch.linalg.vector_norm(x, dim=1, dtype=dtype) ** 2


@_GRAD_DOT.register("cpu")
def _grad_dot_cpu(train, test, normalize):
    dtype = _out_dtype(train.dtype)
    tr, te = train.to(dtype), test.to(dtype)  # no copy for float32/float64 inputs
    out = tr @ te.T
    if normalize:
        cosine_normalize_(out, _sq_norms(tr, dtype), _sq_norms(te, dtype))
    return out


# ----------------------------------------------------------------------------- factored (ghost)

def _factored_reference(train_layers, test_layers, normalize: bool = False) -> torch.Tensor:
    """Materialize each layer's per-sample gradients S_iᵀA_i in float64 and take dense dots."""
    def flat(layers):
        return torch.cat([torch.einsum("nto,ntc->noc", s.double(), a.double()).flatten(1) for a, s in layers], 1)

    return _grad_dot_reference(flat(train_layers), flat(test_layers), normalize)


def _sequence_dot(a_tr, s_tr, a_te, s_te, dtype) -> torch.Tensor:
    """T > 1 ghost form Σ_{t,u} (a_it·a_ju)(s_it·s_ju), chunked over train rows so the
    [rows, m, T, T] product blocks stay within the working set. Runs on any device."""
    n, T, _ = a_tr.shape
    m, U, _ = a_te.shape
    rows = max(1, _CHUNK_BYTES // (2 * 8 * max(1, m * T * U)))
    a_te2, s_te2 = a_te.to(dtype).flatten(0, 1), s_te.to(dtype).flatten(0, 1)  # [m·U, d] (also for U = 0)
    out = torch.empty(n, m, dtype=dtype, device=a_tr.device)
    for i0 in range(0, n, rows):
        a, s = a_tr[i0:i0 + rows].to(dtype), s_tr[i0:i0 + rows].to(dtype)
        c = a.shape[0]
        aa = (a.flatten(0, 1) @ a_te2.T).view(c, T, m, U)
        ss = (s.flatten(0, 1) @ s_te2.T).view(c, T, m, U)
        out[i0:i0 + c] = (aa * ss).sum((1, 3))
    return out


def unit_scaled(layers, dense: torch.Tensor | None = None):
    """Per-sample powers of two that bring gradient i (the (a, s) ``layers`` and the rows of ``dense``)
    to entries near 1, for cosines: ``(layers', dense')``. Per layer and sample, a is scaled to a largest
    entry near 1 (2^-e_a) and s by 2^(e_a − E_i), E_i the sample's largest-entry exponent over layers
    (max|s|·max|a| is an entry of s aᵀ for T = 1, a bound for T > 1) and dense row: every sample's
    gradient is scaled by its own 2^-E_i. Cosines are scale-invariant and powers of two scale exactly,
    so no cosine changes, while float32 squares and products stay in range (gradients or activations
    of 1e-19 have squares that underflow, of 1e19 squares that overflow). Inputs whose exponents all
    stay within ±40 (±400 for float64) come back as they are: nothing to fix, no copies."""
    def exponent(x):  # floor(log2 max|x_i|) per row, float64; −inf for rows of zeros or without entries
        x = x.flatten(1)
        m = x.abs().amax(1).double() if x.shape[1] else x.new_zeros(x.shape[0], dtype=torch.float64)
        return torch.floor(torch.log2(m))

    def finite(e):  # zero rows: any scale (0 stays 0); 0 keeps the factors finite
        return torch.where(torch.isfinite(e), e, torch.zeros_like(e))

    ea = [exponent(a) for a, _ in layers]
    es = [exponent(s) for _, s in layers]
    E = finite(torch.stack([x + y for x, y in zip(ea, es)]
                           + ([exponent(dense)] if dense is not None else [])).amax(0))
    dtype = layers[0][0].dtype if layers else dense.dtype
    limit = 400 if dtype == torch.float64 else 40
    if all(bool((finite(t).abs() <= limit).all()) for t in ea + es + [E]):
        return layers, dense
    # s of a zero a row: scaled to its own entries (its products with other samples' s stay in range)
    s_exp = [torch.where(torch.isfinite(x), x - E, -finite(y)) for x, y in zip(ea, es)]
    layers = [(scale_rows(a, torch.exp2(-finite(x))), scale_rows(s, torch.exp2(e)))
              for (a, s), x, e in zip(layers, ea, s_exp)]
    return layers, None if dense is None else scale_rows(dense, torch.exp2(-E))


def scale_rows(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """x [n, ...] with row i multiplied by the power of two c_i (float64), as a new tensor of x's dtype;
    multiplied in float64, where c_i itself may not fit x's dtype (2^133 for a subnormal float32 row),
    exactly: the product is x_i·c_i rounded once, and exact where it lands in x's normal range."""
    return (x.double() * c.view(-1, *[1] * (x.dim() - 1))).to(x.dtype)


def factored_sq_norms(layers, dtype) -> torch.Tensor:
    """Σ_layers ‖S_iᵀA_i‖²_F per sample: ‖s‖²‖a‖² for T = 1, sum((S Sᵀ)∘(A Aᵀ)) for T > 1.
    ``layers``: (a, s) pairs, 2-D ([n, d]) or 3-D ([n, T, d])."""
    total = 0
    for a, s in layers:
        a, s = a.to(dtype), s.to(dtype)
        if a.dim() == 2 or a.shape[1] == 1:
            a, s = a.flatten(1), s.flatten(1)  # [n, d] (also for n = 0)
            total = total + (a * a).sum(1) * (s * s).sum(1)
        else:
            total = total + ((a @ a.transpose(1, 2)) * (s @ s.transpose(1, 2))).sum((1, 2))
    return total


def grad_dot_factored(train_layers, test_layers, normalize: bool = False,
                      backend: str | None = None) -> torch.Tensor:
    """Σ over layers of ⟨S_iᵀA_i, S_jᵀA_j⟩_F = sum((S_i S_jᵀ) ∘ (A_i A_jᵀ)) (MATH.md §4), ``[n, m]``.

    Args:
        train_layers / test_layers: lists (one entry per layer, same order and widths) of ``(a, s)``:
            ``a [n, d_in]``, ``s [n, d_out]`` (T = 1) or ``[n, T, d_in]``, ``[n, T, d_out]`` — as
            recorded by :func:`capture_linear` (``layer.a``, ``layer.s``; the bias folded into a as a
            column of ones, so the bias gradient is included).
        normalize: Grad-Cos with norms from the same factors (‖s‖·‖a‖ for T = 1); zero norm → 0.
        backend: for the T = 1 layers (the fused kernel: both products per output tile, multiplied
            and accumulated over layers in registers; cpu: torch GEMM tiles of ≤ 16 MiB with the
            Hadamard product as epilogue). Layers with T > 1 use chunked torch batched GEMMs on the
            tensors' device whatever the backend (cost O(n·m·T²·(d_in + d_out))).

    Returns ``[n, m]`` float32 (float64 for float64 inputs).
    """
    for name, layers in (("train_layers", train_layers), ("test_layers", test_layers)):
        if not isinstance(layers, (list, tuple)) or not layers:
            raise ValueError(f"{name}: expected a non-empty list of (a, s) pairs, got {layers!r:.80}")
    if len(train_layers) != len(test_layers):
        raise ValueError(f"test_layers: expected {len(train_layers)} layers (as train_layers), got {len(test_layers)}")
    tr = [check_layer_entry(pair, f"train_layers[{l}] ") for l, pair in enumerate(train_layers)]
    te = [check_layer_entry(pair, f"test_layers[{l}] ") for l, pair in enumerate(test_layers)]
    dtype, device = tr[0][0].dtype, tr[0][0].device
    for l, ((a, s), (b, r)) in enumerate(zip(tr, te)):
        if a.dtype != dtype or b.dtype != dtype or a.device != device or b.device != device:
            raise ValueError(f"layer {l}: expected every a, s in {dtype} on {device}, got "
                             f"{a.dtype}/{b.dtype} on {a.device}/{b.device}")
        if a.shape[2] != b.shape[2] or s.shape[2] != r.shape[2]:
            raise ValueError(f"test_layers[{l}]: expected widths d_in={a.shape[2]}, d_out={s.shape[2]} "
                             f"(as train_layers[{l}]), got {b.shape[2]}, {r.shape[2]}")
        if a.shape[0] != tr[0][0].shape[0] or b.shape[0] != te[0][0].shape[0]:
            raise ValueError(f"layer {l}: every layer must hold the same samples (n, m)")
    out_dtype = _out_dtype(dtype)
    if normalize:  # see unit_scaled: the products and norms of tiny or huge gradients stay in range
        tr, te = unit_scaled(tr)[0], unit_scaled(te)[0]
    single = [l for l in range(len(tr)) if tr[l][0].shape[1] == 1 and te[l][0].shape[1] == 1]
    out = None
    if single:
        impl = _GRAD_DOT_FACTORED.select(backend, device, tr[0][0])
        out = impl.fn([tr[l][0][:, 0] for l in single], [tr[l][1][:, 0] for l in single],
                      [te[l][0][:, 0] for l in single], [te[l][1][:, 0] for l in single])
    for l in range(len(tr)):
        if l not in single:
            part = _sequence_dot(*tr[l], *te[l], out_dtype)
            out = part if out is None else out.add_(part)
    if normalize:
        cosine_normalize_(out, factored_sq_norms(tr, out_dtype), factored_sq_norms(te, out_dtype))
    return _check_finite(out, "train_layers, test_layers")


@_GRAD_DOT_FACTORED.register("torch")
def _factored_torch(A, S, B, R):
    return _factored_reference([(a[:, None], s[:, None]) for a, s in zip(A, S)],
                               [(b[:, None], r[:, None]) for b, r in zip(B, R)]).to(_out_dtype(A[0].dtype))


@_GRAD_DOT_FACTORED.register("cpu")
def _factored_cpu(A, S, B, R):
    dtype = _out_dtype(A[0].dtype)
    n, m = A[0].shape[0], B[0].shape[0]
    B, R = [b.to(dtype) for b in B], [r.to(dtype) for r in R]
    out = torch.zeros(n, m, dtype=dtype)
    rows = max(1, _CHUNK_BYTES // (2 * 4 * max(1, m)))
    aa = torch.empty(min(rows, n), m, dtype=dtype)
    ss = torch.empty_like(aa)
    for i0 in range(0, n, rows):
        c = min(rows, n - i0)
        for a, s, b, r in zip(A, S, B, R):
            torch.mm(a[i0:i0 + c].to(dtype), b.T, out=aa[:c])
            torch.mm(s[i0:i0 + c].to(dtype), r.T, out=ss[:c])
            out[i0:i0 + c].addcmul_(aa[:c], ss[:c])
    return out


# ----------------------------------------------------------------------------- GPU backends
# Kernels: fimoda_kernels/triton/grad_dot.py and csrc/cuda/grad_dot.cu (bound in python/src/grad_dot.cpp).

_DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}


@_GRAD_DOT.register("triton")
def _grad_dot_triton(train, test, normalize):
    from ..triton.grad_dot import grad_dot as kernel

    return kernel(train.contiguous(), test.contiguous(), normalize)


@_GRAD_DOT_FACTORED.register("triton")
def _factored_triton(A, S, B, R):
    from ..triton.grad_dot import grad_dot_factored as kernel

    return kernel([a.contiguous() for a in A], [s.contiguous() for s in S],
                  [b.contiguous() for b in B], [r.contiguous() for r in R])


@_GRAD_DOT.register("cuda")
def _grad_dot_cuda(train, test, normalize):
    from .._dispatch import cuda_stream
    from .._ext import _C

    tr, te = train.contiguous(), test.contiguous()
    out = torch.empty(tr.shape[0], te.shape[0], dtype=_out_dtype(tr.dtype), device=tr.device)
    _C.grad_dot_cuda(tr.data_ptr(), te.data_ptr(), _DTYPE_CODE[tr.dtype], out.data_ptr(), tr.shape[0],
                     te.shape[0], tr.shape[1], normalize, cuda_stream(tr.device))
    return out


@_GRAD_DOT_FACTORED.register("cuda")
def _factored_cuda(A, S, B, R):
    """One launch per layer, each adding (A Bᵀ)∘(S Rᵀ) into the output (accumulate=True after the first)."""
    from .._dispatch import cuda_stream
    from .._ext import _C

    n, m = A[0].shape[0], B[0].shape[0]
    out = torch.empty(n, m, dtype=_out_dtype(A[0].dtype), device=A[0].device)
    stream = cuda_stream(out.device)
    for l, (a, s, b, r) in enumerate(zip(A, S, B, R)):
        a, s, b, r = a.contiguous(), s.contiguous(), b.contiguous(), r.contiguous()
        _C.grad_dot_factored_cuda(a.data_ptr(), s.data_ptr(), b.data_ptr(), r.data_ptr(), _DTYPE_CODE[a.dtype],
                                  out.data_ptr(), n, m, a.shape[1], s.shape[1], l > 0, stream)
    return out
