"""DataInf (MATH.md §8): layer-wise closed-form approximation of (G_l + λ_l I)^{-1}.

score(z, i) = Σ_l (1/λ_l) [ K_l(z, i) − (1/n) Σ_j K_l(z, j) K_l(j, i) / (λ_l + ‖g_{l,j}‖²) ]
with K_l the layer-l gradient inner products and j over a reference set of n training points. A
"layer" (``blocks="layer"``, default) is one captured Linear/Conv2d module (weight and bias together)
or one other parameter; ``blocks="parameter"`` takes every parameter tensor as its own block, as the
DataInf repository's loop over its gradient dict does (the weight and bias of a layer apart).
For captured layers only inner products are formed (factored, :func:`grad_dot_factored`), never
per-sample gradient matrices; parameters outside them (see ``capture_linear``) have their per-sample
gradients materialized: the reference set's, ``[n_ref, numel]``, are held for the whole run (bound
them with ``reference=``), the training set's a chunk at a time.
Damping rules (λ_l from the reference set's gradients, p_l = the layer's parameter count):
"tabular" λ_l = mean_j mean(g_{l,j}²) / 10 (the DataInf repository's default, paper code for
tabular data); "sst2" λ_l = 0.1 · mean_j ‖g_{l,j}‖² / p_l. As MATH.md states them the two are the
same number; both names are kept so configurations of either experiment read as written.
"""
from __future__ import annotations

import dataclasses
from typing import NamedTuple

import torch

from .._validate import check_choice, check_float, check_int, check_seed
from ..grads import SampleError, for_sample_chunks
from ..inner_products import block_sq_norms, gradient_blocks
from ..ops.grad_dot import grad_dot, grad_dot_factored
from ._common import Options

LAMBDA_RULES = ("tabular", "sst2")
BLOCKS = ("layer", "parameter")


@dataclasses.dataclass
class DataInfOptions(Options):
    """Attributes:
        damping: one λ for every layer; None = the ``lambda_rule``.
        lambda_rule: "tabular" (default) or "sst2", see the module docstring.
        reference: size of a random subsample of the training set used as the reference set
            (None, or a size >= n_train: all training points; ``info["reference"]`` says how many).
        seed: seeds the reference subsample.
        blocks: "layer" (default) or "parameter", see the module docstring.
    """
    damping: float | None = None
    lambda_rule: str = "tabular"
    reference: int | None = None
    seed: int = 0
    blocks: str = "layer"

    def validate(self):
        super().validate()
        if self.damping is not None:
            self.damping = check_float("damping", self.damping, positive=True)
        self.lambda_rule = check_choice("lambda_rule", self.lambda_rule, LAMBDA_RULES)
        if self.reference is not None:
            self.reference = check_int("reference", self.reference, min_value=1)
        self.seed = check_seed("seed", self.seed)
        self.blocks = check_choice("blocks", self.blocks, BLOCKS)
        return self


def _gram(b1, b2, backend) -> torch.Tensor:
    if isinstance(b1, tuple):
        return grad_dot_factored([b1], [b2], backend=backend)
    return grad_dot(b1, b2, backend=backend)


def _same_layers(got: list, expected: list, what: str) -> None:
    """DataInf pairs the blocks of two gradient sets layer by layer: their layers must be the same."""
    if got != expected:
        raise RuntimeError(f"model: the captured layers differ between {what} ({got} vs {expected}); the "
                           "capture saw the samples differently in batches of different sizes")


def layer_damping(sq: torch.Tensor, numel: int, rule: str) -> float:
    mean_sq = float(sq.double().mean())
    lam = mean_sq / numel / 10 if rule == "tabular" else 0.1 * mean_sq / numel
    return lam


class _Part(NamedTuple):
    name: str
    numel: int


def _blocks(model, task, x, y, max_memory, per: str):
    """:func:`gradient_blocks`, with ``per="parameter"`` each captured layer with a bias split into its
    weight block (a without the ones column, s) and its bias block (the ones column, s)."""
    blocks, per_sample = gradient_blocks(model, task, x, y, "loss", max_memory)
    if per == "layer":
        return blocks, per_sample
    out = []
    for item, block in blocks:
        if not isinstance(block, tuple):  # an uncovered parameter: its own block already
            out.append((item, block))
            continue
        a, s = block
        prefix = f"{item.name}." if item.name else ""  # a model that is one layer: "weight", "bias"
        weight = _Part(f"{prefix}weight", item.d_out * item.d_in)
        if item.has_bias:
            out += [(weight, (a[..., :-1].contiguous(), s)), (_Part(f"{prefix}bias", item.d_out), (a[..., -1:], s))]
        else:
            out.append((weight, block))
    return out, per_sample


def _set_blocks(model, task, x, y, max_memory, per):
    """:func:`_blocks` of a whole set, captured in chunks under ``max_memory`` (one chunk's autograd
    graph at a time), concatenated per block: what is kept is the blocks themselves."""
    parts = []

    def chunk(start, stop):
        blocks, per_sample = _blocks(model, task, x[start:stop], y[start:stop], max_memory, per)
        if parts:
            _same_layers([i.name for i, _ in blocks], [i.name for i, _ in parts[0]], "batches of one set")
        parts.append(blocks)
        return per_sample

    for_sample_chunks(x.shape[0], max_memory, chunk)
    if len(parts) <= 1:
        return parts[0] if parts else _blocks(model, task, x, y, max_memory, per)[0]
    joined = []
    for k, (item, block) in enumerate(parts[0]):
        pieces = [p[k][1] for p in parts]
        joined.append((item, tuple(map(torch.cat, zip(*pieces))) if isinstance(block, tuple) else torch.cat(pieces)))
    return joined


def _reference(model, task, train, opts):
    """The reference set's blocks with their λ_l and ‖g_{l,j}‖²: ``([(name, rb, lam, sq)], n_ref)``."""
    x, y = train
    ref_idx = None
    if opts.reference is not None and opts.reference < x.shape[0]:
        g = torch.Generator().manual_seed(opts.seed)
        ref_idx = torch.randperm(x.shape[0], generator=g)[:opts.reference].sort().values.to(x.device)
        x, y = x[ref_idx], y[ref_idx]
    try:  # a failing sample named by its training index
        blocks = _set_blocks(model, task, x, y, opts.max_memory, opts.blocks)
    except SampleError as e:
        raise e.shifted(index=ref_idx) if ref_idx is not None else e from None
    ref = []
    for item, rb in blocks:
        sq = block_sq_norms(rb)
        lam = opts.damping if opts.damping is not None else layer_damping(sq, item.numel, opts.lambda_rule)
        if not lam > 0:
            raise ValueError(f"datainf: layer {item.name!r} has zero gradients on the reference set, so its "
                             "damping λ_l is 0; pass damping= explicitly")
        ref.append((item.name, rb, lam, sq))
    return ref, x.shape[0]


def _scores(train_blocks, test_blocks, ref, n_ref, opts, what):
    """Scores ``[c, m]`` of a chunk of training blocks against test blocks (module formula)."""
    names = [name for name, *_ in ref]
    _same_layers([i.name for i, _ in test_blocks], names, f"the {what} and reference sets")
    _same_layers([i.name for i, _ in train_blocks], names, "training batches and the reference set")
    total = 0
    for (_, cb), (_, tb), (_, rb, lam, sq) in zip(train_blocks, test_blocks, ref):
        K_rz = _gram(rb, tb, opts.backend)  # (1/n) K_l(j, z) / (λ_l + ‖g_{l,j}‖²), [n_ref, m]
        weighted = K_rz / ((lam + sq.to(K_rz.dtype))[:, None] * n_ref)
        total = total + (_gram(cb, tb, opts.backend) - _gram(cb, rb, opts.backend) @ weighted) / lam
    return total


def datainf(model, task, train, test, opts):
    ref, n_ref = _reference(model, task, train, opts)
    try:
        te_blocks = _set_blocks(model, task, test[0], test[1], opts.max_memory, opts.blocks)
    except SampleError as e:
        raise e.shifted(prefix="test ") from None
    x, y = train
    n, m = x.shape[0], test[0].shape[0]
    out = None

    def chunk(start, stop):
        nonlocal out
        blocks, per_sample = _blocks(model, task, x[start:stop], y[start:stop], opts.max_memory, opts.blocks)
        total = _scores(blocks, te_blocks, ref, n_ref, opts, "test")
        if out is None:
            out = torch.empty(n, total.shape[1], dtype=total.dtype, device=total.device)
        out[start:stop] = total
        return per_sample + 8 * (n_ref + m) * len(ref)

    for_sample_chunks(n, opts.max_memory, chunk)
    return out, {"lambdas": {name: lam for name, _, lam, _ in ref}, "reference": n_ref}


def datainf_self(model, task, train, opts):
    """score(i, i) for every training point, chunk by chunk (each chunk its own test set): O(n · n_ref)
    inner products, memory of a chunk, not the n_train × n_train matrix."""
    ref, n_ref = _reference(model, task, train, opts)
    x, y = train
    out = None

    def chunk(start, stop):
        nonlocal out
        blocks, per_sample = _blocks(model, task, x[start:stop], y[start:stop], opts.max_memory, opts.blocks)
        total = _scores(blocks, blocks, ref, n_ref, opts, "training").diagonal()
        if out is None:
            out = torch.empty(x.shape[0], dtype=total.dtype, device=total.device)
        out[start:stop] = total
        return per_sample + 8 * (n_ref + stop - start) * len(ref)

    for_sample_chunks(x.shape[0], opts.max_memory, chunk)
    return out, {"lambdas": {name: lam for name, _, lam, _ in ref}, "reference": n_ref}
