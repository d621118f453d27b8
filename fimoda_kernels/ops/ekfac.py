"""K-FAC / EK-FAC kernels (MATH.md §6), per Linear/Conv layer with inputs a and output gradients s.

Public ops (each takes the layers' ``(a, s)`` as recorded by :func:`capture_linear`: ``a [n, d_in]``,
``s [n, d_out]`` for T = 1 or ``[n, T, d_in]``, ``[n, T, d_out]``; the bias folded into a):

- :func:`kfac_factors`: streamed A = (1/N) Σ_{i,t} a aᵀ and S = (1/N) Σ_{i,t} s sᵀ over an iterable of
  batches (a symmetric rank-k accumulate per batch); non-finite values raise, naming layer and batch.
- :func:`ekfac_eigenbases`: eigendecompositions of A and S (torch.linalg.eigh, float64 by default),
  guarded against non-finite factors (kronfluence#42: eigh crashing on NaN covariances).
- :func:`ekfac_eigen_correction`: Λ[o, j] = (1/N) Σ_i ((Q_Sᵀ S_iᵀ A_i Q_A)[o, j])², streamed. The
  vectors are rotated by one GEMM (a Q_A, s Q_S); then T = 1 is a GEMM of the squared rotated
  vectors, (s̃²)ᵀ(ã²), and T > 1 a fused kernel that forms each sample's rotated gradient tile, squares
  it and accumulates it, without storing an [n, d_out, d_in] tensor (cpu: batched GEMMs over chunks,
  each factor rotating S_iᵀA_i instead of the T vectors where that costs fewer flops: conv layers).
- :func:`ekfac_precondition`: (G_EKFAC + λI)^{-1} on the test gradients: rotate, divide by Λ + λ and
  (``basis="original"``) rotate back. Default damping: 0.1 × mean(Λ) per layer (MATH.md §6; kronfluence's heuristic, not its 1e-8 default).
- :func:`ekfac_scores`: scores Σ_t s̃_{i,t}ᵀ W_z ã_{i,t} of training points i against preconditioned
  test gradients W_z in the rotated basis (or, ``basis="original"``, of the unrotated vectors against
  W_z rotated back), from the training factors: the factored kernel (no per-sample d_out × d_in
  matrix of the training set), or — chosen per layer where it is faster, see its ``form`` — chunks of
  per-sample gradients under a 16 MiB budget and one GEMM.

Backends of the three kernels (accumulate, correction, score): "cpu", "triton", "cuda", "torch".
The cpu backend is chunked torch (the machine's BLAS), not csrc/cpu: every kernel here is a GEMM or
batched GEMM plus an O(output) epilogue, and on this class of machine torch's GEMM runs at the
square-GEMM peak (~180 GFLOP/s on 2 cores, TOOLCHAIN.md), which a hand-written OpenMP loop does not
reach; the chunks keep temporaries under 16 MiB. A syrk would halve the accumulate's flops, but torch
exposes none (the accumulate is ~25% of a fit of bench_ekfac's CNN, ~10% of its end to end).
"""
from __future__ import annotations

from typing import Iterable, Sequence

import torch

from .._dispatch import op
from .._validate import (FLOAT_DTYPES, all_finite, check_choice, check_float, check_input, check_layer_entry,
                         check_layer_pair)

_CHUNK_BYTES = 16 * 2**20  # working set of the chunked cpu paths

_FACTORS = op("kfac_factors")
_CORRECTION = op("ekfac_eigen_correction")
_SCORES = op("ekfac_scores")

ACC_DTYPES = (torch.float32, torch.float64)
HEURISTIC_DAMPING_SCALE = 0.1  # MATH.md §6: kronfluence's heuristic (its damping_factor=None) λ = 0.1 × mean(Λ)


def _check_acc_dtype(name: str, dtype) -> torch.dtype:
    if dtype not in ACC_DTYPES:
        raise ValueError(f"{name}: expected torch.float32 or torch.float64, got {dtype!r}")
    return dtype


def _layer_names(names, count: int) -> list[str]:
    if names is None:
        return [f"layer {l}" for l in range(count)]
    names = list(names)
    if len(names) != count:
        raise ValueError(f"names: expected {count} names (one per layer), got {len(names)}")
    return [f"layer {n!r}" for n in names]


def _batch_layers(batch, b: int, expected: int | None, matrices: bool = False) -> list:
    """Validated per-layer (a, s) pairs (3-D) of batch b; with ``matrices`` an entry may instead be a
    3-D tensor of per-sample gradient matrices (kept as is)."""
    if not isinstance(batch, (list, tuple)) or not batch:
        raise ValueError(f"batches[{b}]: expected a non-empty list of (a, s) pairs, got {batch!r:.80}")
    if expected is not None and len(batch) != expected:
        raise ValueError(f"batches[{b}]: expected {expected} layers (as batch 0), got {len(batch)}")
    out = []
    for l, entry in enumerate(batch):
        if matrices and isinstance(entry, torch.Tensor):
            out.append(check_input(f"batches[{b}][{l}]", entry, ndim=3, dtypes=FLOAT_DTYPES))
        elif isinstance(entry, (list, tuple)) and len(entry) == 2:
            out.append(check_layer_entry(entry, f"batches[{b}][{l}] "))
        else:
            raise ValueError(f"batches[{b}][{l}]: expected an (a, s) pair"
                             f"{' or gradient matrices [n, d_out, d_in]' if matrices else ''}, "
                             f"got {type(entry).__name__}")
    return out


def _entry_tensor(entry) -> torch.Tensor:
    """A tensor of a layer entry (its gradient matrices, or a of the pair): rows, device, dtype."""
    return entry if isinstance(entry, torch.Tensor) else entry[0]


# ----------------------------------------------------------------------------- factors

def _kfac_factors_reference(batches) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """float64 (A, S) per layer from a list of batches (each a list of (a, s) per layer)."""
    sums, n = None, 0
    for b, batch in enumerate(batches):
        layers = _batch_layers(batch, b, None if sums is None else len(sums))
        n += layers[0][0].shape[0]
        part = [(torch.einsum("nti,ntj->ij", a.double(), a.double()),
                 torch.einsum("nti,ntj->ij", s.double(), s.double())) for a, s in layers]
        sums = part if sums is None else [(A + pa, S + ps) for (A, S), (pa, ps) in zip(sums, part)]
    return [(A / n, S / n) for A, S in sums]


def kfac_factors(batches: Iterable, names: Sequence[str] | None = None, dtype: torch.dtype = torch.float32,
                 backend: str | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """K-FAC factors per layer, streamed: ``[(A, S), ...]`` with A = (1/N) Σ_{i,t} a_{i,t} a_{i,t}ᵀ
    ``[d_in, d_in]`` and S = (1/N) Σ_{i,t} s_{i,t} s_{i,t}ᵀ ``[d_out, d_out]`` (N = samples, not positions).

    Args:
        batches: iterable (consumed once; a generator is fine) of lists, one ``(a, s)`` pair per layer
            in a fixed order; a ``[n, d]`` / ``[n, T, d]`` (see the module doc).
        names: layer names for error messages.
        dtype: accumulation dtype, torch.float32 (default) or torch.float64; inputs are cast per chunk.
        backend: "cuda", "triton", "cpu", "torch" or None.

    Non-finite values raise ``ValueError`` naming the layer, the factor and the batch: each batch's
    contribution is checked through the accumulator's diagonal (a NaN or Inf in any entry of a row
    makes its diagonal term non-finite), O(d) per batch.
    """
    _check_acc_dtype("dtype", dtype)
    acc, labels, n = None, None, 0
    for b, batch in enumerate(batches):
        layers = _batch_layers(batch, b, None if acc is None else len(acc))
        if acc is None:
            labels = _layer_names(names, len(layers))
            device = layers[0][0].device
            impl = _FACTORS.select(backend, device, layers[0][0])
            acc = [(torch.zeros(a.shape[2], a.shape[2], dtype=dtype, device=device),
                    torch.zeros(s.shape[2], s.shape[2], dtype=dtype, device=device)) for a, s in layers]
        n += layers[0][0].shape[0]
        for l, ((a, s), (A, S)) in enumerate(zip(layers, acc)):
            if a.shape[0] != layers[0][0].shape[0]:
                raise ValueError(f"batches[{b}][{l}]: expected {layers[0][0].shape[0]} samples (as layer 0), "
                                 f"got {a.shape[0]}")
            if a.shape[2] != A.shape[0] or s.shape[2] != S.shape[0]:
                raise ValueError(f"batches[{b}][{l}]: expected widths d_in={A.shape[0]}, d_out={S.shape[0]} "
                                 f"(as batch 0), got {a.shape[2]}, {s.shape[2]}")
            for what, x, C in (("inputs a", a, A), ("output gradients s", s, S)):
                impl.fn(C, x.reshape(x.shape[0] * x.shape[1], x.shape[2]))  # also when d = 0
                if not all_finite(C.diagonal()):
                    raise ValueError(f"kfac_factors: non-finite values (NaN or Inf) in the {what} of "
                                     f"{labels[l]} in batch {b} (check the inputs, targets and parameters)")
    _check_samples(acc, n)
    return [(A.div_(n), S.div_(n)) for A, S in acc]


def _check_samples(acc, n: int) -> None:
    """The streamed averages divide by the sample count N: refuse N = 0 instead of returning NaN."""
    if acc is None:
        raise ValueError("batches: expected at least one batch, got none")
    if n == 0:
        raise ValueError("batches: expected at least one sample, got batches of 0 samples")


@_FACTORS.register("torch")
def _factors_torch(C, x):
    C.add_(x.double().T @ x.double())


@_FACTORS.register("cpu")
def _factors_cpu(C, x):
    """C += xᵀx through torch's GEMM in row chunks (x cast to C's dtype a chunk at a time)."""
    rows = max(1, _CHUNK_BYTES // (8 * max(1, x.shape[1])))
    for r0 in range(0, x.shape[0], rows):
        xc = x[r0:r0 + rows].to(C.dtype)
        C.addmm_(xc.T, xc)


@_FACTORS.register("triton")
def _factors_triton(C, x):
    from ..triton.ekfac import gram_accumulate

    gram_accumulate(C, x.contiguous(), x.contiguous(), symmetric=True, square=False)


@_FACTORS.register("cuda")
def _factors_cuda(C, x):
    _cuda_gram(C, x.contiguous(), x.contiguous(), symmetric=True, square=False)


# ----------------------------------------------------------------------------- eigendecomposition

_EIGH_SERIAL_MAX = 1024


def _eigh(C: torch.Tensor):
    """torch.linalg.eigh; single-threaded on CPU up to 1024 × 1024. Measured on the (loaded) 2-core
    development machine, float64: 129 × 129 took 0.3-7 s with 2 threads and 1.3 ms with one,
    513 × 513 0.9-7 s against 0.15-0.19 s — thread synchronization, not arithmetic, dominated."""
    if C.device.type != "cpu" or C.shape[0] > _EIGH_SERIAL_MAX:
        return torch.linalg.eigh(C)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return torch.linalg.eigh(C)
    finally:
        torch.set_num_threads(threads)


def ekfac_eigenbases(factors: Sequence[tuple[torch.Tensor, torch.Tensor]], names: Sequence[str] | None = None,
                     eigh_dtype: torch.dtype = torch.float64):
    """``[(Q_A, λ_A, Q_S, λ_S), ...]`` from :func:`kfac_factors`' ``[(A, S), ...]`` by
    ``torch.linalg.eigh`` in ``eigh_dtype`` (float64 default: float32 eigh loses the small
    eigenvalues of ill-conditioned covariances); results in the factors' dtype. Raises ``ValueError``
    naming the layer for a non-finite factor instead of letting eigh fail or return NaN."""
    _check_acc_dtype("eigh_dtype", eigh_dtype)
    labels = _layer_names(names, len(factors))
    out = []
    for l, (label, pair) in enumerate(zip(labels, factors)):
        if not isinstance(pair, (list, tuple)) or len(pair) != 2:
            raise ValueError(f"factors[{l}]: expected an (A, S) pair, got {type(pair).__name__}"
                             f"{f' of {len(pair)}' if isinstance(pair, (list, tuple)) else ''}")
        parts = []
        for what, C in (("A (input covariance)", pair[0]), ("S (output-gradient covariance)", pair[1])):
            check_input(f"{label} {what}", C, ndim=2, dtypes=ACC_DTYPES)
            if C.shape[0] != C.shape[1]:
                raise ValueError(f"{label} {what}: expected a square matrix, got shape {tuple(C.shape)}")
            if not all_finite(C):
                raise ValueError(f"ekfac_eigenbases: {label} factor {what} has NaN or Inf entries; "
                                 "refit the factors from finite inputs")
            lam, Q = _eigh(C.to(eigh_dtype))
            parts += [Q.to(C.dtype), lam.to(C.dtype)]
        out.append(tuple(parts))
    return out


def kfac_eigenvalues(lambda_A: torch.Tensor, lambda_S: torch.Tensor) -> torch.Tensor:
    """K-FAC's eigenvalues λ_S ⊗ λ_A as a ``[d_out, d_in]`` matrix (the EK-FAC Λ's layout)."""
    return lambda_S[:, None] * lambda_A[None, :]


# ----------------------------------------------------------------------------- eigenvalue correction

def _rotate(a: torch.Tensor, s: torch.Tensor, Q_A: torch.Tensor, Q_S: torch.Tensor, dtype):
    """(a Q_A, s Q_S) in ``dtype`` (3-D in and out): one GEMM per factor."""
    return a.to(dtype) @ Q_A.to(dtype), s.to(dtype) @ Q_S.to(dtype)


def _ekfac_eigen_correction_reference(batches, eigenbases) -> list[torch.Tensor]:
    """float64 Λ per layer: each sample's gradient S_iᵀA_i materialized, rotated, squared, averaged."""
    sums, n = None, 0
    for b, batch in enumerate(batches):
        layers = _batch_layers(batch, b, None if sums is None else len(sums))
        n += layers[0][0].shape[0]
        part = []
        for (a, s), (Q_A, _, Q_S, _) in zip(layers, eigenbases):
            G = torch.einsum("nto,nti->noi", s.double(), a.double())
            part.append((Q_S.double().T @ G @ Q_A.double()).pow(2).sum(0))
        sums = part if sums is None else [x + p for x, p in zip(sums, part)]
    return [x / n for x in sums]


def ekfac_eigen_correction(batches: Iterable, eigenbases, names: Sequence[str] | None = None,
                           dtype: torch.dtype | None = None, backend: str | None = None) -> list[torch.Tensor]:
    """EK-FAC eigenvalues per layer, streamed: Λ[o, j] = (1/N) Σ_i ((Q_Sᵀ S_iᵀ A_i Q_A)[o, j])², ``[d_out, d_in]``.

    Args:
        batches: iterable of per-layer lists, as :func:`kfac_factors` (same layer order), each entry an
            ``(a, s)`` pair or, for a layer, its per-sample gradient matrices Σ_t s_t a_tᵀ
            ``[n, d_out, d_in]`` (:func:`layer_gradient_matrices`; what :class:`EKFAC` keeps between
            its two passes where they are smaller than the pair).
        eigenbases: :func:`ekfac_eigenbases`' output ``[(Q_A, λ_A, Q_S, λ_S), ...]``.
        dtype: accumulation dtype (default: the eigenvectors'), float32 or float64.
        backend: for the square-accumulate kernel of (a, s) pairs; gradient matrices are rotated by
            torch GEMMs on their device.

    T = 1: Λ = (1/N) (s̃²)ᵀ (ã²) with s̃ = s Q_S, ã = a Q_A — a GEMM of squared rotated vectors (the
    squaring fused into the GEMM's operand loads on triton/cuda). T > 1: on triton/cuda the fused
    kernel forms Σ_t s̃_t ã_tᵀ per sample tile by tile, squares and accumulates it; cpu (and
    gradient-matrix entries) rotate the formed per-sample matrices where that is cheaper (see
    ``_correction_cpu``). Non-finite results raise, naming the layer and the batch.
    """
    labels = _layer_names(names, len(eigenbases))
    acc, n = None, 0
    for b, batch in enumerate(batches):
        layers = _batch_layers(batch, b, len(eigenbases), matrices=True)
        first = _entry_tensor(layers[0])
        if acc is None:
            dt = _check_acc_dtype("dtype", dtype or eigenbases[0][0].dtype)
            impl = _CORRECTION.select(backend, first.device, first)
            acc = [torch.zeros(Q_S.shape[0], Q_A.shape[0], dtype=dt, device=first.device)
                   for Q_A, _, Q_S, _ in eigenbases]
        n += first.shape[0]
        for l, (entry, (Q_A, _, Q_S, _), L) in enumerate(zip(layers, eigenbases, acc)):
            if isinstance(entry, torch.Tensor):
                check_input(f"batches[{b}][{l}]", entry, device=first.device)
                if entry.shape[1:] != L.shape or entry.shape[0] != first.shape[0]:
                    raise ValueError(f"batches[{b}][{l}]: expected gradient matrices [{first.shape[0]}, "
                                     f"{L.shape[0]}, {L.shape[1]}] (the eigenbases of {labels[l]}), got "
                                     f"{tuple(entry.shape)}")
                rows = _chunk_rows(L)
                for i0 in range(0, entry.shape[0], rows):
                    _rotate_square_sum(L, entry[i0:i0 + rows].to(L.dtype), Q_S, Q_A)
            else:
                a, s = entry
                check_input(f"batches[{b}][{l}] a", a, device=first.device)
                if a.shape[0] != first.shape[0]:
                    raise ValueError(f"batches[{b}][{l}]: expected {first.shape[0]} samples (as layer 0), "
                                     f"got {a.shape[0]}")
                if a.shape[2] != Q_A.shape[0] or s.shape[2] != Q_S.shape[0]:
                    raise ValueError(f"batches[{b}][{l}]: expected widths d_in={Q_A.shape[0]}, "
                                     f"d_out={Q_S.shape[0]} (as the eigenbases of {labels[l]}), got "
                                     f"{a.shape[2]}, {s.shape[2]}")
                impl.fn(L, s, a, Q_S, Q_A)
            if not all_finite(L):
                raise ValueError(f"ekfac_eigen_correction: non-finite values (NaN or Inf) for {labels[l]} "
                                 f"in batch {b} (check the inputs, targets and parameters)")
    _check_samples(acc, n)
    return [L.div_(n) for L in acc]


@_CORRECTION.register("torch")
def _correction_torch(L, s, a, Q_S, Q_A):
    ar, sr = _rotate(a, s, Q_A, Q_S, torch.float64)
    L.add_(torch.einsum("nto,nti->noi", sr, ar).pow(2).sum(0).to(L.dtype))


@_CORRECTION.register("cpu")
def _correction_cpu(L, s, a, Q_S, Q_A):
    """Chunks of samples (≤ 16 MiB of [chunk, d_out, d_in]): a batched GEMM forms Σ_t s_t a_tᵀ, which is
    squared in place and summed into L. Each factor's rotation is applied where it costs fewer flops:
    to the T vectors (T·d² per sample) or to the formed d_out × d_in matrix (d_out·d_in² for Q_A,
    d_in·d_out² for Q_S), i.e. s is rotated first iff T ≤ d_in and a iff T ≤ d_out. T = 1 rotates
    both and is one GEMM of the squares, (s̃²)ᵀ(ã²); a 3 × 3 conv layer (T·d_in² ≫ d_out·d_in²)
    rotates the formed matrices."""
    n, T, d_out = s.shape
    d_in = a.shape[2]
    rotate_s, rotate_a = T <= d_in, T <= d_out
    Q_S, Q_A = Q_S.to(L.dtype), Q_A.to(L.dtype)
    s = s.to(L.dtype) @ Q_S if rotate_s else s.to(L.dtype)
    a = a.to(L.dtype) @ Q_A if rotate_a else a.to(L.dtype)
    if T == 1:
        L.addmm_(s[:, 0].square().T, a[:, 0].square())
        return
    rows = _chunk_rows(L)
    for i0 in range(0, n, rows):
        G = torch.bmm(s[i0:i0 + rows].transpose(1, 2), a[i0:i0 + rows])  # [c, d_out, d_in]
        _rotate_square_sum(L, G, None if rotate_s else Q_S, None if rotate_a else Q_A)


def _chunk_rows(L: torch.Tensor) -> int:
    """Samples per chunk of [chunk, d_out, d_in] temporaries in L's dtype under the 16 MiB budget."""
    return max(1, _CHUNK_BYTES // (L.element_size() * L.numel()))


def _rotate_square_sum(L, G, Q_S, Q_A):
    """L += Σ_i ((Q_Sᵀ G_i Q_A)²) for a chunk G [c, d_out, d_in] in L's dtype (overwritten); a factor
    given as None is already applied."""
    c, d_out, d_in = G.shape
    if Q_A is not None:
        G = (G.reshape(c * d_out, d_in) @ Q_A.to(L.dtype)).view(c, d_out, d_in)
    if Q_S is not None:
        G = torch.matmul(Q_S.to(L.dtype).T, G)
    L.add_(G.square_().sum(0))


def layer_gradient_matrices(a: torch.Tensor, s: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Per-sample gradient matrices Σ_t s_t a_tᵀ ``[n, d_out, d_in]`` in ``dtype`` of a layer's ``(a, s)``
    (2-D or 3-D, as the capture records them): one batched GEMM. :class:`EKFAC` keeps these instead
    of the pair between its passes when d_out·d_in < T·(d_in + d_out) (conv layers: a fraction of
    the patches' size) and hands them to :func:`ekfac_eigen_correction`."""
    a, s = check_layer_pair(a, s)
    _check_acc_dtype("dtype", dtype)
    return torch.bmm(s.to(dtype).transpose(1, 2), a.to(dtype))


@_CORRECTION.register("triton")
def _correction_triton(L, s, a, Q_S, Q_A):
    from ..triton.ekfac import eigen_correction

    ar, sr = _rotate(a, s, Q_A, Q_S, L.dtype)
    eigen_correction(L, sr.contiguous(), ar.contiguous())


@_CORRECTION.register("cuda")
def _correction_cuda(L, s, a, Q_S, Q_A):
    from .._dispatch import cuda_stream
    from .._ext import _C

    ar, sr = _rotate(a, s, Q_A, Q_S, L.dtype)
    sr, ar = sr.contiguous(), ar.contiguous()
    if sr.shape[1] == 1:
        _cuda_gram(L, sr[:, 0], ar[:, 0], symmetric=False, square=True)
        return
    n, T, d_out = sr.shape
    _C.ekfac_rotated_square_cuda(sr.data_ptr(), ar.data_ptr(), L.data_ptr(), L.dtype == torch.float64,
                                 n, T, d_out, ar.shape[2], cuda_stream(L.device))


def _cuda_gram(C, x, y, symmetric, square):
    from .._dispatch import cuda_stream
    from .._ext import _C

    # held in locals until the launch: a temporary freed after .data_ptr() could be reallocated to
    # the other operand's cast before the kernel reads it
    x, y = x.to(C.dtype).contiguous(), y.to(C.dtype).contiguous()
    _C.ekfac_gram_cuda(x.data_ptr(), y.data_ptr(), C.data_ptr(), C.dtype == torch.float64, x.shape[0], x.shape[1],
                       y.shape[1], symmetric, square, cuda_stream(C.device))


# ----------------------------------------------------------------------------- preconditioning

def default_damping(Lam: torch.Tensor) -> float:
    """kronfluence's heuristic λ = 0.1 × mean(Λ) for one layer."""
    return HEURISTIC_DAMPING_SCALE * float(Lam.double().mean())


def _ekfac_precondition_reference(test_layers, eigenbases, eigenvalues, damping) -> list[torch.Tensor]:
    """float64 (G_l + λ_l I)^{-1} g_z per layer as ``[m, d_out, d_in]`` in the original basis, from
    the explicit Kronecker eigenbasis Q = Q_S ⊗ Q_A and diag(vec Λ) (a dense (d_out·d_in)² matrix)."""
    out = []
    for (b, r), (Q_A, _, Q_S, _), Lam, lam in zip(test_layers, eigenbases, eigenvalues, damping):
        b, r = check_layer_pair(b, r)
        V = torch.einsum("nto,nti->noi", r.double(), b.double()).flatten(1)
        Q = torch.kron(Q_S.double(), Q_A.double())
        H = Q @ torch.diag(Lam.double().flatten() + lam) @ Q.T
        out.append(torch.linalg.solve(H, V.T).T.reshape(-1, Q_S.shape[0], Q_A.shape[0]))
    return out


def _check_damping(damping, eigenvalues) -> list[float]:
    if damping is None:
        return [default_damping(Lam) for Lam in eigenvalues]
    if isinstance(damping, (list, tuple)):
        if len(damping) != len(eigenvalues):
            raise ValueError(f"damping: expected {len(eigenvalues)} values (one per layer), got {len(damping)}")
        return [check_float(f"damping[{l}]", d, min_value=0.0) for l, d in enumerate(damping)]
    return [check_float("damping", damping, min_value=0.0)] * len(eigenvalues)


def ekfac_precondition(test_layers, eigenbases, eigenvalues, damping=None, basis: str = "rotated",
                       dtype: torch.dtype | None = None) -> list[torch.Tensor]:
    """(G_EKFAC + λI)^{-1} applied to each test point's layer gradient V_z = Σ_t r_t b_tᵀ.

    Args:
        test_layers: per-layer ``(b, r)`` of the test points (as ``(a, s)`` elsewhere).
        eigenbases: :func:`ekfac_eigenbases` output; eigenvalues: per-layer Λ ``[d_out, d_in]``
            (EK-FAC's :func:`ekfac_eigen_correction` or K-FAC's :func:`kfac_eigenvalues`).
        damping: λ ≥ 0 for every layer, a list (one per layer), or None for 0.1 × mean(Λ) per layer.
        basis: "rotated" returns W_z = (Q_Sᵀ V_z Q_A) ⊘ (Λ + λ); "original" rotates back:
            Q_S W_z Q_Aᵀ = (G + λI)^{-1} V_z (:func:`ekfac_scores` takes either, given the same ``basis``).
        dtype: compute dtype (default: the eigenvectors').

    The rotation is formed from the factors, Q_Sᵀ V_z Q_A = Σ_t (Q_Sᵀ r_t)(Q_Aᵀ b_t)ᵀ. Returns
    ``[m, d_out, d_in]`` per layer. A non-positive Λ + λ raises (the inverse does not exist).
    """
    check_choice("basis", basis, ("rotated", "original"))
    if len(test_layers) != len(eigenbases) or len(eigenvalues) != len(eigenbases):
        raise ValueError(f"test_layers, eigenvalues: expected {len(eigenbases)} layers (as eigenbases), got "
                         f"{len(test_layers)} and {len(eigenvalues)}")
    lams = _check_damping(damping, eigenvalues)
    out = []
    for l, (pair, (Q_A, _, Q_S, _), Lam, lam) in enumerate(zip(test_layers, eigenbases, eigenvalues, lams)):
        b, r = check_layer_entry(pair, f"test_layers[{l}] ")
        dt = _check_acc_dtype("dtype", dtype or Q_A.dtype)
        check_input(f"eigenvalues[{l}]", Lam, ndim=2, dtypes=FLOAT_DTYPES, finite=True)
        if tuple(Lam.shape) != (Q_S.shape[0], Q_A.shape[0]) or b.shape[2] != Q_A.shape[0] or r.shape[2] != Q_S.shape[0]:
            raise ValueError(f"test_layers[{l}], eigenvalues[{l}]: expected widths d_in={Q_A.shape[0]}, "
                             f"d_out={Q_S.shape[0]} and Λ of shape {(Q_S.shape[0], Q_A.shape[0])}, got "
                             f"{b.shape[2]}, {r.shape[2]} and {tuple(Lam.shape)}")
        denom = Lam.to(dt) + lam
        if not bool((denom > 0).all()):
            raise ValueError(f"damping: Λ + λ must be positive for layer {l} (min {float(denom.min()):.3g}); "
                             "use a larger damping")
        br, rr = _rotate(b, r, Q_A, Q_S, dt)
        W = torch.bmm(rr.transpose(1, 2), br).div_(denom)
        if basis == "original":
            W = Q_S.to(dt) @ W @ Q_A.to(dt).T
        out.append(W)
    return out


# ----------------------------------------------------------------------------- scores

def _ekfac_scores_reference(train_layers, eigenbases, preconditioned) -> torch.Tensor:
    """float64 Σ_layers ⟨Q_Sᵀ S_iᵀ A_i Q_A, W_z⟩ with each training gradient materialized."""
    total = 0
    for (a, s), (Q_A, _, Q_S, _), W in zip(train_layers, eigenbases, preconditioned):
        a, s = check_layer_pair(a, s)
        G = Q_S.double().T @ torch.einsum("nto,nti->noi", s.double(), a.double()) @ Q_A.double()
        total = total + G.flatten(1) @ W.double().flatten(1).T
    return total


def ekfac_scores(train_layers, eigenbases, preconditioned, form: str = "auto",
                 backend: str | None = None, basis: str = "rotated") -> torch.Tensor:
    """``[n, m]`` scores Σ_layers ⟨Q_Sᵀ S_iᵀ A_i Q_A, W_z⟩_F = g_iᵀ (G + λI)^{-1} g_z for training
    points i (factors ``(a, s)``) and :func:`ekfac_precondition`'s rotated-basis ``W`` of test points z.

    The training vectors are rotated (ã = a Q_A, s̃ = s Q_S, one GEMM each) and the kernel evaluates
    Σ_t s̃_tᵀ W_z ã_t without any per-sample d_out × d_in matrix: Y = ã W_zᵀ then a row-wise dot with s̃.
    ``basis="original"`` takes ``W`` from ``ekfac_precondition(..., basis="original")`` instead and
    scores the unrotated vectors, ⟨S_iᵀ A_i, Q_S W_z Q_Aᵀ⟩ (the same number): rotating m test
    matrices back once replaces rotating all n·T training vectors, n·T·(d_in² + d_out²) multiply-adds
    per batch (for bench_ekfac's CNN a third of the scoring flops); :class:`EKFAC` scores this way.
    Cost O(n·T·m·d_in·d_out). Result in W's dtype (float32 or float64); non-finite → ``ValueError``.

    ``form``: "factored" (the kernel above, every layer), "materialized" (per chunk of ≤ 16 MiB, the
    gradients Σ_t s̃_t ã_tᵀ (unrotated for "original") by a batched GEMM, then one GEMM against all W_z: cost
    O(n·(T + m)·d_in·d_out), temporaries c·d_out·d_in per chunk of c samples, never n × p) or "auto":
    per layer, factored when T·m ≤ d_in, else materialized chunks. Why: both do the same
    2·n·m·d_in·d_out multiply-adds for T = 1, but the factored form streams an intermediate
    Y = ã W_zᵀ of T·m·d_out values per sample through memory where the materialized form writes
    d_out·d_in and then runs one large GEMM; for T > 1 the factored form also costs T·m/(T + m)
    times the flops. Measured (2 loaded cores, n = 2048, m = 512, d_out = 128, d_in = 129):
    factored 5.5-7.5 s, materialized 2.4-2.8 s. ``backend`` applies to the factored kernel; the
    materialized chunks are torch GEMMs on the tensors' device.
    """
    check_choice("form", form, ("auto", "factored", "materialized"))
    check_choice("basis", basis, ("rotated", "original"))
    if not isinstance(train_layers, (list, tuple)) or not train_layers:
        raise ValueError(f"train_layers: expected a non-empty list of (a, s) pairs, got {train_layers!r:.80}")
    if len(train_layers) != len(eigenbases) or len(preconditioned) != len(eigenbases):
        raise ValueError(f"train_layers, preconditioned: expected {len(eigenbases)} layers (as eigenbases), got "
                         f"{len(train_layers)} and {len(preconditioned)}")
    layers = [check_layer_entry(pair, f"train_layers[{l}] ") for l, pair in enumerate(train_layers)]
    W0 = check_input("preconditioned[0]", preconditioned[0], ndim=3, dtypes=ACC_DTYPES)
    n, m = layers[0][0].shape[0], W0.shape[0]
    out = torch.zeros(n, m, dtype=W0.dtype, device=W0.device)
    impl = _SCORES.select(backend, W0.device, layers[0][0])
    for l, ((a, s), (Q_A, _, Q_S, _), W) in enumerate(zip(layers, eigenbases, preconditioned)):
        check_input(f"preconditioned[{l}]", W, ndim=3, dtypes=(W0.dtype,), device=W0.device)
        if (a.shape[0] != n or W.shape[0] != m or tuple(W.shape[1:]) != (Q_S.shape[0], Q_A.shape[0])
                or a.shape[2] != Q_A.shape[0] or s.shape[2] != Q_S.shape[0]):
            raise ValueError(f"train_layers[{l}], preconditioned[{l}]: expected a [{n}, T, {Q_A.shape[0]}], "
                             f"s [{n}, T, {Q_S.shape[0]}], W [{m}, {Q_S.shape[0]}, {Q_A.shape[0]}], got "
                             f"{tuple(a.shape)}, {tuple(s.shape)}, {tuple(W.shape)}")
        if basis == "rotated":
            ar, sr = _rotate(a, s, Q_A, Q_S, W.dtype)
        else:
            ar, sr = a.to(W.dtype), s.to(W.dtype)
        if form == "factored" or (form == "auto" and a.shape[1] * m <= a.shape[2]):
            impl.fn(out, sr, ar, W)
        else:
            _scores_materialized(out, sr, ar, W)
    if not all_finite(out):
        raise ValueError("ekfac_scores: expected finite values, got NaN or Inf (check the inputs and damping)")
    return out


def _scores_materialized(out, sr, ar, W):
    """out += vec(Σ_t s̃_t ã_tᵀ) @ vec(W)ᵀ in chunks of ≤ 16 MiB of per-sample gradients (of the
    vectors given: rotated or not)."""
    n, T, d_out = sr.shape
    m, _, d_in = W.shape
    Wf = W.reshape(m, d_out * d_in).T
    rows = max(1, _CHUNK_BYTES // (out.element_size() * max(1, d_out * d_in)))
    for i0 in range(0, n, rows):
        G = torch.bmm(sr[i0:i0 + rows].transpose(1, 2), ar[i0:i0 + rows])
        out[i0:i0 + G.shape[0]].addmm_(G.reshape(G.shape[0], -1), Wf)


@_SCORES.register("torch")
def _scores_torch(out, sr, ar, W):
    out.add_(torch.einsum("nto,zoi,nti->nz", sr.double(), W.double(), ar.double()).to(out.dtype))


@_SCORES.register("cpu")
def _scores_cpu(out, sr, ar, W):
    """Chunks of training rows: Y = ã W_zᵀ for all z at once ([rows·T, m·d_out] GEMM, ≤ 16 MiB),
    then Σ_{t,o} s̃ ∘ Y into the output."""
    n, T, d_out = sr.shape
    m, _, d_in = W.shape
    Wt = W.reshape(m * d_out, d_in).T
    rows = max(1, _CHUNK_BYTES // (out.element_size() * max(1, T * m * d_out)))
    for i0 in range(0, n, rows):
        c = min(rows, n - i0)
        Y = (ar[i0:i0 + c].reshape(c * T, d_in) @ Wt).view(c, T, m, d_out)
        out[i0:i0 + c] += torch.einsum("ctzo,cto->cz", Y, sr[i0:i0 + c])


@_SCORES.register("triton")
def _scores_triton(out, sr, ar, W):
    from ..triton.ekfac import factored_scores

    factored_scores(out, sr.contiguous(), ar.contiguous(), W.contiguous())


@_SCORES.register("cuda")
def _scores_cuda(out, sr, ar, W):
    from .._dispatch import cuda_stream
    from .._ext import _C

    sr, ar, W = sr.contiguous(), ar.contiguous(), W.contiguous()
    n, T, d_out = sr.shape
    _C.ekfac_scores_cuda(sr.data_ptr(), ar.data_ptr(), W.data_ptr(), out.data_ptr(), out.dtype == torch.float64,
                         n, T, W.shape[0], d_out, ar.shape[2], cuda_stream(out.device))
