"""Projection of a model's per-sample gradients (MATH.md §4, §9) without materializing them.

``project_model`` captures every covered Linear/Conv2d layer's inputs a and output gradients s
and projects them with :func:`project_linear` at the layer's parameter offset; the parameters the
capture does not cover (other modules, grouped convs, ...) get materialized per-sample gradients,
projected with :func:`project` at their own offsets. With the same seed the result equals
``project(per_sample_grads(model, ...), k, seed)``.
"""
from __future__ import annotations

import torch
from torch import nn

from ._validate import check_choice, check_int, check_seed
from .grads import _check_batch, capture_linear, for_sample_chunks, per_sample_grads
from .ops.project import KINDS, LINEAR_KINDS, _out_dtype, project, project_linear


def _project_layer(layer, k, seed, kind, backend) -> torch.Tensor:
    a = layer.a[..., :-1] if layer.has_bias else layer.a  # project_linear adds the bias itself
    d_w = layer.d_out * layer.d_in
    adjacent = layer.has_bias and layer.bias_offset == layer.weight_offset + d_w
    # kronecker keeps a layer's bias in its own P_out ⊗ P_in block wherever the bias is registered;
    # a layer without a bias has none to project (a phantom one biased the inner products by ssᵀ)
    out = project_linear(a, layer.s, k, seed, layer.weight_offset,
                         bias=adjacent or (kind == "kronecker" and layer.has_bias), kind=kind, backend=backend)
    if layer.has_bias and not adjacent and kind != "kronecker":  # bias elsewhere in the parameter order
        s = layer.s if layer.s.dim() == 2 else layer.s.sum(1)
        out += project(s, k, seed, kind, layer.bias_offset, backend=backend)
    return out


def project_model(model: nn.Module, task, inputs: torch.Tensor, targets: torch.Tensor, k: int, seed: int,
                  wrt: str = "loss", kind: str = "rademacher", max_memory: int = 2**30,
                  backend: str | None = None) -> torch.Tensor:
    """Projected per-sample gradients ``[n, k]`` of ``model`` (rows Pᵀ∇ℓ_i, or Pᵀ∇f_i for
    ``wrt="output"``), parameters in ``named_parameters()`` order, P as in :func:`projection_matrix`.

    Args:
        model, task, inputs, targets, wrt: as in :func:`per_sample_grads` (call ``model.eval()``).
        k, seed: projection dimension and seed. kind: "rademacher", "gaussian" or "kronecker"
            (per-layer P_out ⊗ P_in, see :func:`project_linear`; parameters outside captured layers
            then use the Rademacher projection at their offsets).
        max_memory: bytes for one chunk of samples' captured activations (a, s) and materialized
            uncovered gradients; samples are processed in chunks that fit.
        backend: for the projection kernels.

    Peak memory ≈ n·k·4 (output) + max_memory + the model's autograd graph for one chunk.
    A captured layer's parameter also used outside that layer's forward (``F.linear(x, layer.weight)``
    elsewhere in the model) is not detected: its gradient through that use is missed (see
    :func:`capture_linear`); ``per_sample_grads`` is exact there.
    """
    _, slots = _check_batch(model, task, inputs, targets, wrt)
    kind = check_choice("kind", kind, LINEAR_KINDS)
    k = check_int("k", k, min_value=1, max_value=2**32 - 1)  # here too: no chunk runs when n = 0
    seed = check_seed("seed", seed)
    max_memory = check_int("max_memory", max_memory, min_value=1)
    n = inputs.shape[0]
    cap = capture_linear(model)
    out = None
    if n == 0:
        dtype = dict(model.named_parameters())[slots[0].name].dtype
        return torch.zeros(0, k, dtype=_out_dtype(dtype), device=inputs.device)

    def chunk(start, stop):
        nonlocal out
        x, y = inputs[start:stop], targets[start:stop]
        cap.run(task, x, y, wrt)
        unc = cap.uncovered
        parts = [_project_layer(layer, k, seed, kind, backend) for layer in cap.layers]
        if unc:
            G = per_sample_grads(model, task, x, y, wrt, max_memory, param_names=[u.name for u in unc])
            col = 0
            for u in unc:
                parts.append(project(G[:, col:col + u.numel], k, seed, kind if kind in KINDS else "rademacher",
                                     u.offset, backend=backend))
                col += u.numel
        block = torch.stack(parts).sum(0)
        if out is None:
            out = torch.empty(n, k, dtype=block.dtype, device=block.device)
        out[start:stop] = block
        return cap.bytes_per_sample() + 3 * sum(u.numel for u in unc) * block.element_size()

    for_sample_chunks(n, max_memory, chunk)
    return out
