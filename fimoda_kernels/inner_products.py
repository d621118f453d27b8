"""Grad-Dot / Grad-Cos scores of a model (MATH.md §3, §4) without materializing n × p gradients.

Per captured Linear/Conv2d layer the cheaper of two exact forms is used, by FLOPs per (train,
test) pair: the factored form sum((S_i S_jᵀ) ∘ (A_i A_jᵀ)) costs T_i·T_j·(d_in + d_out); the
materialized form builds the layer's per-sample gradients (d_out × d_in each) and takes dense
dots. Parameters the capture does not cover always use materialized per-sample gradients.
"""
from __future__ import annotations

import torch
from torch import nn

from ._validate import FLOAT_DTYPES, check_int, check_tensor
from .grads import SampleError, _check_batch, capture_linear, for_sample_chunks, per_sample_grads
from .ops.grad_dot import cosine_normalize_, factored_sq_norms, grad_dot, grad_dot_factored, unit_scaled


def _check_pair(name: str, pair):
    if not isinstance(pair, (tuple, list)) or len(pair) != 2:
        raise TypeError(f"{name}: expected an (inputs, targets) pair, got {type(pair).__name__}")
    return pair


def _choose_form(layer, T_test: int, n: int, m: int) -> str:
    T = layer.T or 1
    factored = T * T_test * (layer.d_in + layer.has_bias + layer.d_out)
    materialized = layer.numel * (1 + (n * T + m * T_test) / max(1, n * m))  # dots + building G
    return "factored" if factored <= materialized else "materialized"


class _Side:
    """One side (train chunk or test set): captured layers + materialized uncovered gradients."""

    def __init__(self, model, task, x, y, wrt, max_memory, unit: bool = False):
        self.cap = capture_linear(model).run(task, x, y, wrt)
        unc = self.cap.uncovered
        self.uncovered = per_sample_grads(model, task, x, y, wrt, max_memory,
                                          param_names=[u.name for u in unc]) if unc else None
        if unit and (self.cap.layers or self.uncovered is not None):
            # for cosines: each sample's gradient scaled by a power of two to entries near 1 (new
            # tensors, not in place: layers may share one gradient tensor)
            pairs, self.uncovered = unit_scaled([(l.a, l.s) for l in self.cap.layers], self.uncovered)
            for l, (a, s) in zip(self.cap.layers, pairs):
                l.a, l.s = a, s

    def dense(self, names):
        """[n, Σ numel] of the materialized layers in ``names`` plus the uncovered parameters; takes
        over the uncovered block (one copy of it is held, not two)."""
        blocks = [l.per_sample_grads() for l in self.cap.layers if l.name in names]
        if self.uncovered is not None:
            blocks.append(self.uncovered)
            self.uncovered = None
        return (blocks[0] if len(blocks) == 1 else torch.cat(blocks, 1)) if blocks else None


def grad_dot_model(model: nn.Module, task, train, test, normalize: bool = False, wrt: str = "loss",
                   max_memory: int = 2**30, backend: str | None = None, return_info: bool = False):
    """Grad-Dot (or Grad-Cos with ``normalize=True``) scores ``[n_train, n_test]`` of ``model``.

    Args:
        train, test: ``(inputs, targets)`` pairs. task, wrt: as in :func:`per_sample_grads`
            (call ``model.eval()``). normalize: Grad-Cos over the whole parameter vector (zero
            norm → 0). max_memory: bytes for one chunk of training samples' captured activations and
            materialized gradients (the test set is captured once). backend: for the kernels.
        return_info: also return ``{"layers": {name: "factored" | "materialized"},
            "uncovered": [parameter names]}`` — which form each layer used.

    Peak memory ≈ n_train·n_test·4 (output) + the test set's captured activations and
    materialized gradients + max_memory.
    """
    x_tr, y_tr = _check_pair("train", train)
    x_te, y_te = _check_pair("test", test)
    _check_batch(model, task, x_tr, y_tr, wrt)
    _check_batch(model, task, x_te, y_te, wrt)
    if not isinstance(normalize, bool):
        raise TypeError(f"normalize: expected a bool, got {type(normalize).__name__}")
    max_memory = check_int("max_memory", max_memory, min_value=1)
    n, m = x_tr.shape[0], x_te.shape[0]
    try:
        te = _Side(model, task, x_te, y_te, wrt, max_memory, unit=normalize)
    except SampleError as e:  # say which set
        raise e.shifted(prefix="test ") from None
    t_test = {l.name: l.T or 1 for l in te.cap.layers}
    forms = {l.name: _choose_form(l, t_test[l.name], n, m) for l in te.cap.layers}
    materialized = {name for name, f in forms.items() if f == "materialized"}
    te_dense = te.dense(materialized)
    te_factored = [(l.a, l.s) for l in te.cap.layers if l.name not in materialized]
    out = sq_tr = None

    def chunk(start, stop):
        nonlocal out, sq_tr
        tr = _Side(model, task, x_tr[start:stop], y_tr[start:stop], wrt, max_memory, unit=normalize)
        if [l.name for l in tr.cap.layers] != list(forms):
            raise RuntimeError("model: the captured layers differ between the train and test batches "
                               f"({[l.name for l in tr.cap.layers]} vs {list(forms)})")
        tr_factored = [(l.a, l.s) for l in tr.cap.layers if l.name not in materialized]
        tr_dense = tr.dense(materialized)
        parts, sq = [], []
        if tr_factored:
            parts.append(grad_dot_factored(tr_factored, te_factored, backend=backend))
            sq.append(factored_sq_norms(tr_factored, parts[-1].dtype))
        if tr_dense is not None:
            parts.append(grad_dot(tr_dense, te_dense, backend=backend))
            sq.append(torch.linalg.vector_norm(tr_dense, dim=1, dtype=parts[-1].dtype) ** 2)
        block = parts[0] if len(parts) == 1 else parts[0].add_(parts[1])  # in place: no stacked copy
        if out is None:
            out = torch.empty(n, m, dtype=block.dtype, device=block.device)
            sq_tr = torch.empty(n, dtype=block.dtype, device=block.device)
        out[start:stop], sq_tr[start:stop] = block, torch.stack(sq).sum(0)
        dense_bytes = 0 if tr_dense is None else tr_dense[0].numel() * tr_dense.element_size()
        return tr.cap.bytes_per_sample() + dense_bytes

    for_sample_chunks(n, max_memory, chunk)
    if out is None:  # no training samples
        out = torch.empty(0, m, dtype=x_te.dtype, device=x_te.device)
    elif normalize:
        sq_te = 0
        if te_factored:
            sq_te = factored_sq_norms(te_factored, out.dtype)
        if te_dense is not None:
            sq_te = sq_te + torch.linalg.vector_norm(te_dense, dim=1, dtype=out.dtype) ** 2
        cosine_normalize_(out, sq_tr, sq_te)
    if return_info:
        return out, {"layers": forms, "uncovered": [u.name for u in te.cap.uncovered]}
    return out



def gradient_blocks(model, task, x, y, wrt, max_memory):
    """One capture of a batch split into parameter blocks: ``[(item, block)]`` with ``item`` a
    :class:`CapturedLayer` and ``block`` its ``(a, s)`` pair, or an :class:`UncoveredParam` and
    ``block`` its materialized per-sample gradients ``[n, numel]``; plus the bytes one sample used."""
    cap = capture_linear(model).run(task, x, y, wrt)
    out = [(l, (l.a, l.s)) for l in cap.layers]
    per_sample = cap.bytes_per_sample()
    unc = cap.uncovered
    if unc:
        G = per_sample_grads(model, task, x, y, wrt, max_memory, param_names=[u.name for u in unc])
        col = 0
        for u in unc:
            out.append((u, G[:, col:col + u.numel]))
            col += u.numel
        per_sample += 3 * G.shape[1] * G.element_size()
    return out, per_sample


def block_sq_norms(block) -> torch.Tensor:
    """‖g_block,i‖² per sample of one :func:`gradient_blocks` block."""
    if isinstance(block, tuple):
        return factored_sq_norms([block], block[0].dtype)
    return torch.linalg.vector_norm(block, dim=1) ** 2  # no [n, numel] temporary


def layer_vectors(layer, vectors: torch.Tensor) -> torch.Tensor:
    """Rows of ``vectors [r, p]`` (flattened in named_parameters order) restricted to one captured
    layer, as gradient matrices ``[r, d_out, d_in(+1)]`` (bias as the last column)."""
    nw = layer.d_out * layer.d_in
    flat = vectors[:, layer.weight_offset:layer.weight_offset + nw]
    if layer.has_bias:
        flat = torch.cat([flat, vectors[:, layer.bias_offset:layer.bias_offset + layer.d_out]], 1)
    return layer.flat_to_grad_matrix(flat)


def factored_dot_vectors(a: torch.Tensor, s: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """⟨Σ_t s_{i,t} a_{i,t}ᵀ, W_k⟩_F = Σ_t s_{i,t}ᵀ W_k a_{i,t} for every sample i and matrix k:
    ``a [n, (T,) c]``, ``s [n, (T,) o]``, ``W [r, o, c]`` → ``[n, r]``. One GEMM (a Wᵀ) and a
    reduction against s; the per-sample gradient matrices are never formed."""
    a3, s3 = (a, s) if a.dim() == 3 else (a[:, None], s[:, None])
    n, T, c = a3.shape
    r, o, _ = W.shape
    W = W.to(a3.dtype)
    U = (a3.reshape(n * T, c) @ W.reshape(r * o, c).T).view(n, T, r, o)
    return torch.einsum("ntro,nto->nr", U, s3.to(U.dtype))


def grad_dot_vectors(model: nn.Module, task, inputs: torch.Tensor, targets: torch.Tensor,
                     vectors: torch.Tensor, wrt: str = "loss", max_memory: int = 2**30) -> torch.Tensor:
    """Inner products ``[n, r]`` of every sample's gradient (∇ℓ_i, or ∇f_i for ``wrt="output"``)
    with the rows of ``vectors [r, p]`` (flattened in :func:`param_layout` order), e.g. inverse-HVP
    solutions of test gradients (CG, LiSSA). Captured Linear/Conv2d layers use
    :func:`factored_dot_vectors`; uncovered parameters use materialized per-sample gradients of
    those parameters only. Samples run in chunks under ``max_memory`` bytes (activations, the
    uncovered gradients and the [chunk, T, r, d_out] intermediate).
    """
    task, slots = _check_batch(model, task, inputs, targets, wrt)
    p = sum(s.numel for s in slots)
    check_tensor("vectors", vectors, ndim=2, dtypes=FLOAT_DTYPES, device=inputs.device, finite=True)
    if vectors.shape[1] != p:
        raise ValueError(f"vectors: expected a [r, {p}] tensor (p = the model's trainable parameters), "
                         f"got shape {tuple(vectors.shape)}")
    max_memory = check_int("max_memory", max_memory, min_value=1)
    n, r = inputs.shape[0], vectors.shape[0]
    out = None

    def chunk(start, stop):
        nonlocal out
        blocks, per_sample = gradient_blocks(model, task, inputs[start:stop], targets[start:stop], wrt, max_memory)
        parts, inter = [], 0
        for item, block in blocks:
            if isinstance(block, tuple):
                parts.append(factored_dot_vectors(*block, layer_vectors(item, vectors)))
                inter += (item.T or 1) * r * item.d_out
            else:
                parts.append(block @ vectors[:, item.offset:item.offset + item.numel].to(block.dtype).T)
        total = torch.stack(parts).sum(0)
        if out is None:
            out = torch.empty(n, r, dtype=total.dtype, device=total.device)
        out[start:stop] = total
        return per_sample + inter * total.element_size()

    for_sample_chunks(n, max_memory, chunk)
    if out is None:  # no samples
        out = torch.empty(0, r, dtype=torch.promote_types(inputs.dtype, vectors.dtype), device=inputs.device)
    return out


def grad_sq_norms(model: nn.Module, task, inputs: torch.Tensor, targets: torch.Tensor,
                  wrt: str = "loss", max_memory: int = 2**30) -> dict[str, tuple[int, torch.Tensor]]:
    """Per block of parameters, ``{name: (numel, ‖g_block,i‖² for every sample [n])}``: one block
    per captured Linear/Conv2d layer (weight and bias together, keyed by the module name) and one
    per uncovered parameter (keyed by the parameter name). Without materializing n × p."""
    task, _ = _check_batch(model, task, inputs, targets, wrt)
    max_memory = check_int("max_memory", max_memory, min_value=1)
    norms: dict[str, list] = {}

    def chunk(start, stop):
        blocks, per_sample = gradient_blocks(model, task, inputs[start:stop], targets[start:stop], wrt, max_memory)
        for item, block in blocks:
            norms.setdefault(item.name, [item.numel, []])[1].append(block_sq_norms(block))
        return per_sample

    for_sample_chunks(inputs.shape[0], max_memory, chunk)
    return {name: (numel, torch.cat(parts)) for name, (numel, parts) in norms.items()}
