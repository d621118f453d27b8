"""The further-training gold standard (MATH.md §2): every leave-one-out run of a study trained at once.

:func:`further_train` trains (N_LOO + 1) × R models — the full-data run and one run per left-out point,
for each seed — as one batched ensemble and returns their test losses at every evaluation point. The
result equals the paper's sequential protocol (one model at a time, ``torch.optim``) to rounding:

- per (model, seed): ``g = torch.Generator().manual_seed(seed)``; each epoch the order is
  ``torch.randperm(N, generator=g)`` (one draw per epoch); batches are consecutive slices of
  ``batch_size`` (the last one smaller);
- mode "remove": the left-out index is deleted from each epoch's permutation (that run has N − 1
  points, so its batch boundaries, and possibly its number of batches per epoch, differ);
- mode "downweight": the full permutation for every run; the run leaving out i minimizes
  ``mean_{k∈batch} ℓ(z_k) − ℓ(z_i)/N`` at every step;
- every run starts from the given model's parameters (the model is not modified); test losses are
  per-sample losses in eval mode, t = 0 (the given model) first.

Note: ``DataLoader(shuffle=True)`` / ``RandomSampler(generator=g)`` in torch ≥ 2.x draws *two*
permutations per epoch (the second one for an empty tail), so its epoch e uses draw 2e; the protocol
here (and the paper's tabular code) draws one permutation per epoch.

Each step, per model m: loss_m = Σ_k w_{m,k} ℓ(z_{idx[m,k]}; θ_m) with per-model index rows padded to a
common width by entries of weight 0 (exact zeros in every gradient), then one fused optimizer update
of all models (:func:`fimoda_kernels.ops.ensemble_step.ensemble_step`). Two gradient paths:

- "fused" for MLPs (``nn.Sequential`` of ``nn.Linear`` and elementwise activations): forward and
  backward written out as batched GEMMs (``torch.baddbmm``/``bmm``) over the model axis into
  preallocated buffers, one ``index_select`` gather per step;
- "generic" for any ``nn.Module`` whose per-sample losses do not depend on the rest of the batch:
  ``torch.func.vmap(grad(weighted_loss))`` over the models' parameters.

Parameters, gradients and optimizer state of a chunk of models live in flat buffers made of one
contiguous ``[M, numel]`` block per parameter tensor (so each layer's weights are one contiguous
batch for the GEMMs). Models are processed in chunks that fit ``max_memory``; after each chunk the
losses so far are written atomically to ``checkpoint_dir``, and a chunk still running after
``_PARTIAL_EVERY_S`` seconds also saves its state (parameters, optimizer state, step, losses so far)
at its next evaluation point, and again as often; a run started again with the same arguments skips
the finished chunks, continues a saved chunk from its step and gives identical results. "The same"
is checked: the checkpoint's fingerprint covers the settings, the data and every parameter and buffer by value, the
architecture (``repr``) and the code of the model's and a custom loss's classes outside torch
(bytecode, constants, closure values), so another forward() or loss is refused, not resumed.

Before training, the model must be finite and the mean training-loss gradient at it finite (badly
scaled data is named then, not blamed on the learning rate when the runs diverge).
"""
from __future__ import annotations

import contextlib
import copy
import functools
import hashlib
import json
import logging
import os
import re
import time
import types
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from ._dispatch import FallbackWarning
from ._mlp import mlp_layers
from ._validate import all_finite, check_choice, check_float, check_int, check_int_list, check_tensor
from .grads import activation_numel, batch_dependent_modules, sparse_embeddings
from .ops.bias_act import _BWD as _EPI_BWD, _FWD as _EPI_FWD, FORWARD_ACTS, epilogue_backend
from .ops.ensemble_step import EnsembleStepper, check_hyperparameters, state_buffers
from .tasks import CrossEntropyTask, MSETask, Task, get_task, output_derivatives

__all__ = ["further_train", "FurtherTrainingResult", "FurtherTrainingDivergedError"]


class FurtherTrainingDivergedError(ValueError):
    """A run's test loss left the training dtype's range: the learning rate (or the data's scale)."""


_EVAL_RANDOM = "model: its eval-mode forward draws random numbers; the test losses would be random"
_FORMAT = 2  # 2: losses in float64 (1: in the training dtype; results still load, checkpoints do not resume)
_RESULT_FORMATS = (1, 2)
_CHECKPOINT_NAME = "further_training.pt"
_PARTIAL_NAME = "further_training.chunk.pt"
# a chunk running this long is checkpointed at its next evaluation point, and so on (one chunk of a
# GPU study holds all its models and can run for hours)
_PARTIAL_EVERY_S = 600.0
# Models trained together at most on CPU. Larger chunks amortize the fixed cost of each op call (Python,
# OpenMP fork/join) over more models; smaller ones keep the working set cached. For the Energy MLP a
# model's step touches ~0.9 MB (parameters, gradient, 128-wide activations and their gradients), so
# 256 models stay within a large L3 (NOTES-further.md). GPUs take whole memory-bounded chunks.
_CPU_MODELS_PER_CHUNK = 64


# ----------------------------------------------------------------------------- result

@dataclass
class FurtherTrainingResult:
    """Test losses of a further-training study.

    Attributes:
        losses: ``[n_evals, n_test, n_loo + 1, n_seeds]`` float64 (computed in float64 from the
            outputs whatever the training dtype, except for a custom loss that refuses float64 outputs;
            results saved by the previous format are widened on load); model 0 is the full-data run,
            model 1 + j leaves out ``loo_indices[j]``; seed axis in the order of ``seeds``.
        eval_points: the epoch (or step) number of each evaluation, 0 (the given model) first.
        eval_unit: "epoch" or "step".
        loo_indices, seeds: as passed.
        config: the arguments that determine the numbers (optimizer, lr, batch_size, ...) plus the
            fingerprint of model and data, for caching and checking by study runners.
    """
    losses: torch.Tensor
    eval_points: list
    eval_unit: str
    loo_indices: list
    seeds: list
    config: dict = field(default_factory=dict)

    def gold(self, adjust: str = "mean", seeds: Sequence[int] | None = None) -> torch.Tensor:
        """Gold scores τ_t(z, i), ``[n_evals, n_test, n_loo]`` float64 (MATH.md §2):
        adjust "mean" (eq. 13): L[t, z, i, r] − mean_j L[t, z, j, r] over the LOO runs j;
        adjust "full" (eq. 17): L[t, z, i, r] − L[t, z, full, r]; then the mean over the seeds
        ``seeds`` (seed values, default all)."""
        adjust = check_choice("adjust", adjust, ("mean", "full"))
        if seeds is None:
            cols = list(range(len(self.seeds)))
        else:
            seeds = check_int_list("seeds", seeds)
            missing = [s for s in seeds if s not in self.seeds]
            if missing:
                raise ValueError(f"seeds: expected seeds of this result {self.seeds}, got {missing} among them")
            cols = [self.seeds.index(s) for s in seeds]
        L = self.losses[..., cols].to(torch.float64)
        loo = L[:, :, 1:]
        base = L[:, :, :1] if adjust == "full" else loo.mean(2, keepdim=True)
        return (loo - base).mean(-1)

    def save(self, path) -> None:
        """Write to ``path`` (atomically: a temporary file, then a rename)."""
        _atomic_save(self._state(), Path(path))

    def _state(self) -> dict:
        return dict(format=_FORMAT, losses=self.losses, eval_points=list(self.eval_points),
                    eval_unit=self.eval_unit, loo_indices=list(self.loo_indices), seeds=list(self.seeds),
                    config_json=json.dumps(self.config, sort_keys=True))

    @classmethod
    def load(cls, path) -> "FurtherTrainingResult":
        state = torch.load(Path(path), map_location="cpu", weights_only=True)
        if isinstance(state, dict) and "done" in state and "eval_points" not in state:
            raise ValueError(f"path: {path} is a further_train checkpoint, not a saved result: run further_train "
                             f"with checkpoint_dir={str(Path(path).parent)!r} and the same arguments to finish it")
        if not isinstance(state, dict) or state.get("format") not in _RESULT_FORMATS:
            raise ValueError(f"path: {path} is not a saved FurtherTrainingResult (formats {_RESULT_FORMATS})")
        # format 1 held the losses in the training dtype: widened here, their rounding stays
        return cls(state["losses"].double(), state["eval_points"], state["eval_unit"], state["loo_indices"],
                   state["seeds"], json.loads(state["config_json"]))


def _atomic_save(obj, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


class _Partial:
    """The state of a chunk in progress (module docstring): saved at evaluation points once
    ``_PARTIAL_EVERY_S`` seconds have passed since the chunk started or last saved, restored when the
    same chunk (same arguments, same models) runs again. The schedule is a function of the global
    step, so the rest of the run is the one an uninterrupted chunk would have done."""

    def __init__(self, path: Path, config_json: str, pairs: list):
        self.path, self.config_json, self.pairs = path, config_json, [list(p) for p in pairs]
        self.last = time.monotonic()

    def load(self) -> dict | None:
        if not self.path.exists():
            return None
        state = torch.load(self.path, map_location="cpu", weights_only=True)
        same = (state.get("format") == _FORMAT and state.get("config_json") == self.config_json
                and state.get("pairs") == self.pairs)
        return state if same else None  # another chunk's (the chunking changed): start this one afresh

    def due(self) -> bool:
        return time.monotonic() - self.last >= _PARTIAL_EVERY_S

    def save(self, global_step: int, tensors: dict) -> None:
        _atomic_save(dict(format=_FORMAT, config_json=self.config_json, pairs=self.pairs, global_step=global_step,
                          **{k: v.cpu() for k, v in tensors.items() if v is not None}), self.path)
        self.last = time.monotonic()


# ----------------------------------------------------------------------------- MLP recognition

_aten = torch.ops.aten


def _activation(m: nn.Module):
    """(forward(z) -> h, backward_(g, z, h): g ← g·act'(z) in place, epilogue) of one of
    ``_mlp.ACTIVATIONS`` other than Identity. Activations whose derivative needs only h run in place on
    z; the backward functions are autograd's own (aten ``*_backward`` into ``grad_input=g``), so the
    fused gradients round as autograd's, and nothing is allocated per step. ``epilogue`` is the
    (act, slope) of ``ops.bias_act`` when its one-pass epilogues apply (derivative from h), else None."""
    t = type(m)
    if t is nn.ReLU:
        return (torch.relu_, lambda g, z, h: _aten.threshold_backward.grad_input(g, h, 0, grad_input=g),
                ("relu", 0.0))
    if t is nn.Tanh:
        return (torch.tanh_, lambda g, z, h: _aten.tanh_backward.grad_input(g, h, grad_input=g), ("tanh", 0.0))
    if t is nn.Sigmoid:
        return (torch.sigmoid_, lambda g, z, h: _aten.sigmoid_backward.grad_input(g, h, grad_input=g),
                ("sigmoid", 0.0))
    if t is nn.LeakyReLU:
        slope = m.negative_slope
        if slope < 0:  # h's sign no longer tells z's: keep z (aten refuses the in-place backward too)
            return ((lambda z: F.leaky_relu(z, slope)),
                    (lambda g, z, h: _aten.leaky_relu_backward.grad_input(g, z, slope, False, grad_input=g)), None)
        return ((lambda z: F.leaky_relu_(z, slope)),
                (lambda g, z, h: _aten.leaky_relu_backward.grad_input(g, h, slope, True, grad_input=g)),
                ("leaky_relu", slope))
    if t is nn.SiLU:
        return F.silu, lambda g, z, h: _aten.silu_backward.grad_input(g, z, grad_input=g), None
    if t is nn.GELU:
        approx = m.approximate
        return ((lambda z: F.gelu(z, approximate=approx)),
                (lambda g, z, h: _aten.gelu_backward.grad_input(g, z, approximate=approx, grad_input=g)), None)
    raise AssertionError(f"no fused form for {t.__name__}")  # mlp_layers admits only the types above


# ----------------------------------------------------------------------------- schedule

class _Schedule:
    """Batch composition of every model of a chunk at every step (MATH.md §2), built on the fly.

    Models are (seed, left-out index or −1 for the full run). ``steps()`` yields per optimizer step
    ``(idx [M, W] int64, w [M, W], active [M] bool or None, evaluate_after: bool, active count or None)``.
    """

    def __init__(self, n: int, batch: int, mode: str, epochs: int | None, steps: int | None,
                 eval_every: int | None, seeds: list, loo: list, dtype, device):
        self.n, self.B, self.mode, self.epochs, self.total_steps, self.eval_every = (
            n, batch, mode, epochs, steps, eval_every)
        self.device, self.dtype = device, dtype
        M = len(seeds)
        self.M = M
        uniq = sorted(set(seeds))
        self.sid = torch.tensor([uniq.index(s) for s in seeds], device=device)
        self.loo = torch.tensor(loo, dtype=torch.int64, device=device)
        is_loo = self.loo >= 0
        removes = mode == "remove"
        self.count = torch.where(is_loo & removes, n - 1, n)  # points per epoch
        self.nb = (self.count + batch - 1) // batch  # batches per epoch
        nb_min = int(self.nb.min())
        self.slots = int(self.nb.max())
        self.n_epochs = epochs if epochs is not None else -(-steps // nb_min)
        perms = []
        for s in uniq:
            g = torch.Generator().manual_seed(s)
            perms.append(torch.stack([torch.randperm(n, generator=g) for _ in range(self.n_epochs)]))
        self.perms = torch.stack(perms).to(device)  # [S, E, N]
        if removes:
            # position of each model's left-out index in each epoch's permutation (N: nothing removed)
            inv = torch.argsort(self.perms, dim=-1)  # inv[s, e, i] = position of i
            pos = inv[self.sid, :, self.loo.clamp(min=0)]  # [M, E]
            self.pos = torch.where(is_loo[:, None], pos, torch.full_like(pos, n))
        self.width = batch if removes else batch + 1
        self.ar = torch.arange(batch, device=device)
        self.rows = torch.arange(M, device=device)

    def total_model_steps(self) -> int:
        if self.epochs is not None:
            return int(self.nb.sum()) * self.epochs
        return self.M * self.total_steps

    def _batches(self, s0: int, s1: int):
        """Index rows [S, M, W], weights [S, M, W] and active [S, M] of global steps s0 ≤ s < s1.

        Epoch training: step s is batch slot k = s mod slots of epoch s div slots (slots = the most
        batches per epoch of any model), a model without that slot is inactive. Step training: model
        m's step s is batch s mod nb_m of its epoch s div nb_m (its own epoch boundaries)."""
        N, B = self.n, self.B
        s = torch.arange(s0, s1, device=self.device)[:, None]  # [S, 1]
        if self.epochs is not None:
            e, k = (s // self.slots).expand(-1, self.M), (s % self.slots).expand(-1, self.M)
            active = k < self.nb
        else:
            e, k = s // self.nb, s % self.nb
            active = torch.ones_like(e, dtype=torch.bool)
        J = k[..., None] * B + self.ar  # [S, M, B] positions in the (reduced) epoch order
        valid = (J < self.count[:, None]) & active[..., None]
        if self.mode == "remove":
            pos = self.pos[self.rows, e]  # [S, M]
            J = J + (J >= pos[..., None]).to(J.dtype)
        row = self.sid * self.n_epochs + e  # [S, M]
        idx = self.perms.view(-1, N)[row[..., None], J.clamp_(max=N - 1)]
        cnt = valid.sum(-1, keepdim=True).clamp_(min=1).to(self.dtype)
        w = valid.to(self.dtype) / cnt
        if self.mode == "downweight":
            # the left-out point's own term: −ℓ(z_i)/N at every step (weight 0 for the full run)
            extra = self.loo.clamp(min=0).expand(idx.shape[0], -1)[..., None]
            w_extra = (self.loo >= 0).to(self.dtype).expand(idx.shape[0], -1)[..., None] * (-1.0 / N)
            idx, w = torch.cat([idx, extra], -1), torch.cat([w, w_extra], -1)
        return idx, w, active

    def n_steps(self) -> int:
        """Global steps of the chunk: also the most steps any of its models takes."""
        return self.epochs * self.slots if self.epochs is not None else self.total_steps

    def steps(self, block: int = 64, count: bool = False, start: int = 0):
        """See the class docstring; from global step ``start`` on (a resumed chunk); the active count
        is None unless ``count`` (it costs a device sync per block of steps)."""
        total = self.n_steps()
        all_active = self.epochs is None or bool((self.nb == self.slots).all())
        for s0 in range(start, total, block):
            idx, w, active = self._batches(s0, min(total, s0 + block))
            counts = ([self.M] * idx.shape[0] if all_active else active.sum(1).tolist()) if count \
                else [None] * idx.shape[0]
            for q in range(idx.shape[0]):
                s = s0 + q + 1  # steps done after this one
                if self.epochs is not None:
                    evaluate = s % self.slots == 0
                else:
                    evaluate = s == total or s % self.eval_every == 0
                yield idx[q], w[q], None if all_active else active[q], evaluate, counts[q]


# ----------------------------------------------------------------------------- gradient paths

class _FlatParams:
    """Parameters of M models in one flat buffer: one contiguous [M, numel] block per tensor."""

    def __init__(self, named: list, M: int, dtype, device):
        self.names = [n for n, _ in named]
        self.shapes = [tuple(p.shape) for _, p in named]
        self.segments = [p.numel() for _, p in named]
        total = M * sum(self.segments)
        self.theta = torch.empty(total, dtype=dtype, device=device)
        self.grad = torch.zeros(total, dtype=dtype, device=device)
        self.M = M
        self.params = self._views(self.theta)
        self.grads = self._views(self.grad)
        for v, (_, p) in zip(self.params, named):
            v.copy_(p.detach().to(dtype).expand_as(v))

    def _views(self, flat):
        out, off = [], 0
        for shape, n in zip(self.shapes, self.segments):
            out.append(flat[off:off + self.M * n].view(self.M, *shape))
            off += self.M * n
        return out


class _FusedMLP:
    """Batched forward/backward of M MLPs written out as GEMMs over the model axis, into buffers
    allocated once per chunk (a fresh multi-MiB tensor per op would cost page faults every step).

    ``ops.bias_act`` fuses, where the activation allows it, a hidden layer's bias + activation into one
    pass and its backward (act' and the bias gradient's sum) into another; a final one-output layer
    (regression) is folded into the pass of the layer before it, both ways (``head``)."""

    def __init__(self, layers, flat: _FlatParams, width: int, index: dict):
        """``index``: id of each trained parameter → its position in ``flat`` (a Linear's bias may be
        registered before its weight)."""
        self.flat, self.M = flat, flat.M
        # (W, b or None, gW, gb or None, act fwd, act backward_, epilogue (act, slope) or None)
        self.layers = []
        for lin, act in layers:
            k = index[id(lin.weight)]
            W, gW = flat.params[k], flat.grads[k]
            b = gb = None
            if lin.bias is not None:
                k = index[id(lin.bias)]
                b, gb = flat.params[k], flat.grads[k]
            self.layers.append((W, b, gW, gb) + (act if act else (None, None, None)))
        if epilogue_backend(flat.theta) == "cpu":
            self._epi_fwd, self._epi_bwd = _EPI_FWD.impls["cpu"].fn, _EPI_BWD.impls["cpu"].fn
        else:  # GPU: baddbmm's bias and aten's one-pass backward beat the epilogues' torch reference
            self.layers = [layer[:6] + (None,) for layer in self.layers]
        last, before = self.layers[-1], self.layers[-2] if len(self.layers) > 1 else None
        self.head = before is not None and before[6] is not None and last[0].shape[1] == 1 and last[4] is None
        dtype, dev = flat.theta.dtype, flat.theta.device
        d0 = layers[0][0].in_features
        self.X = torch.empty(self.M, width, d0, dtype=dtype, device=dev)
        # pre-activations (activations in place where the derivative needs only them) and the
        # gradients with respect to each hidden layer's output
        self.Z = [torch.empty(self.M, width, lin.out_features, dtype=dtype, device=dev) for lin, _ in layers]
        self.G = [torch.empty(self.M, width, lin.out_features, dtype=dtype, device=dev) for lin, _ in layers[:-1]]

    def forward(self, x: torch.Tensor, keep: bool):
        """Outputs [M, n, C] for inputs [M, n, d0] (or shared [n, d0]); with ``keep`` into the
        training buffers, returning every layer's (z, h) for :meth:`grad`."""
        h, hs = x, [x]
        L, M = len(self.layers), self.M
        for l, (W, b, _, _, act, _, epi) in enumerate(self.layers):
            if keep and epi is not None and epi[0] in FORWARD_ACTS:
                z = self.Z[l]
                torch.bmm(h, W.transpose(1, 2), out=z)
                if self.head and l == L - 2:  # z ← act(z + b), and the one-output layer's z from it
                    W1, b1 = self.layers[-1][:2]
                    out = self.Z[-1]
                    self._epi_fwd(z, b, *epi, W1.view(M, -1), out.view(M, -1))
                    if b1 is not None:
                        out += b1[:, None, :]
                    hs += [(z, z), (out, out)]
                    return out, hs
                self._epi_fwd(z, b, *epi)  # z ← act(z + b): h = z
                hs.append((z, z))
                h = z
                continue
            if keep:
                z = self.Z[l]
                if b is not None:
                    torch.baddbmm(b[:, None, :], h, W.transpose(1, 2), out=z)
                else:
                    torch.bmm(h, W.transpose(1, 2), out=z)
            else:
                z = torch.matmul(h, W.transpose(1, 2))
                if b is not None:
                    z += b[:, None, :]
            h = act(z) if act is not None else z
            hs.append((z, h))
        return h, hs

    def grad(self, x_train, y_train, task, idx, w):
        M, Wd = idx.shape
        torch.index_select(x_train, 0, idx.view(-1), out=self.X.view(M * Wd, -1))
        out, hs = self.forward(self.X, keep=True)
        g = output_derivatives(task, out, y_train[idx], w)
        last_backward = self.layers[-1][5]
        if last_backward is not None:  # an activation after the last Linear: g along its z
            last_backward(g, *hs[-1])
        bias_done = False  # the epilogue summed this layer's bias gradient with its backward
        for l in range(len(self.layers) - 1, -1, -1):
            W, b, gW, gb, _, _, _ = self.layers[l]
            if gb is not None and not bias_done:
                torch.sum(g, 1, out=gb)
            if l > 0:
                z, h = hs[l]
                _, _, _, gb_in, _, backward_, epi = self.layers[l - 1]
                g_in = self.G[l - 1]
                bias_done = epi is not None
                if self.head and l == len(self.layers) - 1:
                    # g_in = (g ⊗ W)·act'(h), gb_in, and gW = Σ_rows g h in one pass
                    self._epi_bwd(g_in, h, gb_in, *epi, g.reshape(M, Wd), W.view(M, -1), gW.view(M, -1))
                    g = g_in
                    continue
                torch.bmm(g.transpose(1, 2), h, out=gW)
                if W.shape[1] == 1:  # one output: the input gradient is an outer product
                    torch.mul(g, W, out=g_in)
                else:
                    torch.bmm(g, W, out=g_in)
                if epi is not None:
                    self._epi_bwd(g_in, h, gb_in, *epi)  # g_in ← g_in·act'(h), gb_in = Σ_rows g_in
                elif backward_ is not None:
                    backward_(g_in, z, h)
                g = g_in
            else:
                torch.bmm(g.transpose(1, 2), hs[0], out=gW)

    def test_losses(self, x_test, y_test, task, wide: bool) -> torch.Tensor:
        out, _ = self.forward(x_test, keep=False)
        return _per_model_losses(task, out, y_test, wide)


def _f64(t: torch.Tensor) -> torch.Tensor:
    return t.double() if t.is_floating_point() else t


def _per_model_losses(task: Task, out: torch.Tensor, y_test: torch.Tensor, wide: bool) -> torch.Tensor:
    """Test losses [M, n] in float64 (see :func:`_test_loss`)."""
    M, n = out.shape[:2]
    y = y_test.expand(M, *y_test.shape).reshape(M * n, *y_test.shape[1:])
    return _test_loss(task, out.reshape(M * n, *out.shape[2:]), y, wide).reshape(M, n)


def _test_loss(task: Task, out: torch.Tensor, y: torch.Tensor, wide: bool) -> torch.Tensor:
    """Per-sample test losses from the outputs, float64. ``wide``: computed in float64 whatever the
    training dtype (built-in losses, and custom ones that take float64 outputs): the gold scores are
    differences of losses between runs, far below a float32 loss's rounding for confidently classified
    points (a cross-entropy of 2e-6 rounds in steps of ~1e-7 through its log-sum-exp; the leave-one-out
    differences are ~1e-9), so float32 evaluation made whole rows of gold exact zeros."""
    return task.loss(_f64(out), _f64(y)) if wide else task.loss(out, y).double()


class _Generic:
    """vmap over the models of grad of the weighted per-sample loss, for any nn.Module; a loop over
    the models where vmap cannot batch the model (nn.GRU/LSTM/RNN have no batching rule)."""

    def __init__(self, base: nn.Module, flat: _FlatParams, buffers: dict):
        self.base, self.flat, self.buffers = base, flat, buffers
        self._loop = False

    def _params(self):
        return dict(zip(self.flat.names, self.flat.params))

    def _map(self, fn, *args):
        """vmap(fn)(*args) over dim 0 of every tensor (dict values too), else fn model by model."""
        if not self._loop:
            try:
                return vmap(fn)(*args)
            except torch.OutOfMemoryError:  # a RuntimeError too, but no reason to go model by model
                raise
            except (RuntimeError, NotImplementedError) as e:
                warnings.warn(f"further_train: torch.func.vmap cannot batch this model ({type(e).__name__}: "
                              f"{str(e)[:160]}); training the models of a chunk one at a time (slower)",
                              FallbackWarning, stacklevel=4)
                self._loop = True
        pick = lambda a, i: {k: v[i] for k, v in a.items()} if isinstance(a, dict) else a[i]
        outs = [fn(*(pick(a, i) for a in args)) for i in range(self.flat.M)]
        if isinstance(outs[0], dict):
            return {k: torch.stack([o[k] for o in outs]) for k in outs[0]}
        return torch.stack(outs)

    def grad(self, x_train, y_train, task, idx, w):
        base, buffers = self.base, self.buffers

        def weighted_loss(params, x, y, wt):
            out = functional_call(base, (params, buffers), (x,))
            return (task.loss(out, y) * wt).sum()

        base.train()
        grads = self._map(grad(weighted_loss), self._params(), x_train[idx], y_train[idx], w)
        for name, g in zip(self.flat.names, self.flat.grads):
            g.copy_(grads[name])

    def test_losses(self, x_test, y_test, task, wide: bool) -> torch.Tensor:
        base, buffers = self.base, self.buffers

        def losses(params):
            return _test_loss(task, functional_call(base, (params, buffers), (x_test,)), y_test, wide)

        base.eval()
        with torch.no_grad():
            return self._map(losses, self._params())


# ----------------------------------------------------------------------------- the engine

def _tensor_digest(h, t: torch.Tensor) -> None:
    t = t.detach().cpu().contiguous()
    h.update(f"{t.dtype}{tuple(t.shape)}".encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())


_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")  # object.__repr__'s memory address: not the same in a new process


def _value_digest(h, v, depth: int = 0, seen: dict | None = None) -> None:
    """A setting or captured value by content, the same in a new process: tensors and arrays by value,
    functions by code (:func:`_function_digest`), plain data and containers by content, an object by
    its class's code and its fields (``__dict__`` and slots, so nn.HuberLoss(delta=5) differs from
    delta=1 although both print as HuberLoss()); an object without fields by a repr that shows no
    memory address, else by type. Loggers count by name only: their caches change with the process's
    history and must not refuse a resume."""
    seen = {} if seen is None else seen  # id -> object, held so that no id is reused meanwhile
    if isinstance(v, torch.Tensor):
        _tensor_digest(h, v)
    elif isinstance(v, (bool, int, float, complex, str, bytes, type(None), torch.dtype, torch.device)):
        h.update(repr(v).encode())
    elif type(v).__module__ == "numpy" and hasattr(v, "tobytes"):  # ndarray, numpy scalars
        h.update(f"{getattr(v, 'dtype', '')}{getattr(v, 'shape', '')}".encode() + v.tobytes())
    elif isinstance(v, os.PathLike):
        h.update(f"path {os.fspath(v)}".encode())  # not its lazily filled caches (one holds a string hash)
    elif id(v) in seen or depth > 12:  # each object once (cycles, shared parts); very deep graphs by type
        h.update(f"<{type(v).__qualname__}>".encode())
    elif isinstance(v, (list, tuple)):
        h.update(f"{type(v).__name__}{len(v)}".encode())
        for x in v:
            _value_digest(h, x, depth + 1, seen)
    elif isinstance(v, (set, frozenset)):  # in an order that does not depend on the hash seed
        h.update(repr(sorted(map(repr, v))).encode())
    elif isinstance(v, dict):
        for k in sorted(v, key=repr):
            h.update(repr(k).encode())
            _value_digest(h, v[k], depth + 1, seen)
    elif isinstance(v, (types.FunctionType, types.MethodType, functools.partial, types.BuiltinFunctionType,
                        types.BuiltinMethodType)):
        seen[id(v)] = v
        _function_digest(h, v, depth + 1, seen)
    elif isinstance(v, type):
        _class_digest(h, v, depth + 1, seen)
    elif isinstance(v, (logging.Logger, types.ModuleType)):
        h.update(f"{type(v).__name__} {v.__name__ if isinstance(v, types.ModuleType) else v.name}".encode())
    else:
        seen[id(v)] = v
        fields = _fields(v)
        if fields is None:  # a C-level object: Fraction(1, 3) shows its value; <lock at 0x…> does not
            text = repr(v)
            h.update((type(v).__qualname__ if _ADDRESS.search(text) else text).encode())
            return
        _class_digest(h, type(v), depth + 1, seen)
        for k, x in sorted(fields.items()):
            h.update(k.encode())
            _value_digest(h, x, depth + 1, seen)


def _fields(v) -> dict | None:
    """An object's ``__dict__`` and slot values (slots found as descriptors, so a string ``__slots__``
    or a private, name-mangled slot counts too); None for an object with neither."""
    fields = dict(vars(v)) if hasattr(v, "__dict__") else None
    for klass in type(v).__mro__:
        for name, attr in vars(klass).items():
            if isinstance(attr, types.MemberDescriptorType):
                try:
                    value = attr.__get__(v, type(v))
                except AttributeError:  # an unset slot
                    continue
                fields = {} if fields is None else fields
                fields.setdefault(name, value)
    return fields


def _code_digest(h, code: types.CodeType) -> None:
    h.update(code.co_code + repr(code.co_names).encode())
    for c in code.co_consts:
        if isinstance(c, types.CodeType):
            _code_digest(h, c)
        elif isinstance(c, frozenset):  # `x in {"a", "b"}`: its repr's order changes with the string hash seed
            h.update(repr(sorted(map(repr, c))).encode())
        else:
            h.update(repr(c).encode())


def _function_digest(h, fn, depth: int = 0, seen: dict | None = None) -> None:
    """A function by what it computes: its bytecode, constants, names, defaults and closure values
    (two closures of one factory differ; its qualified name alone would not tell them apart)."""
    if isinstance(fn, functools.partial):
        _function_digest(h, fn.func, depth + 1, seen)
        _value_digest(h, (fn.args, fn.keywords), depth + 1, seen)
        return
    seen = {} if seen is None else seen  # id -> object, held so that no id is reused meanwhile
    owner = getattr(fn, "__self__", None)  # a bound method's instance (HuberLoss(delta=5).forward), a
    if owner is not None:                   # builtin's module or type (torch.tanh vs torch.sigmoid)
        if isinstance(owner, (types.ModuleType, type)):
            h.update(f"of {owner.__name__}".encode())
        else:
            _value_digest(h, owner, depth + 1, seen)
    fn = getattr(fn, "__func__", fn)
    code = getattr(fn, "__code__", None)
    h.update(f"{getattr(fn, '__module__', '')}.{getattr(fn, '__qualname__', getattr(fn, '__name__', ''))}".encode())
    if code is None:  # a builtin: its names above
        return
    _code_digest(h, code)
    for d in fn.__defaults__ or ():
        _value_digest(h, d, depth + 1, seen)
    for cell in fn.__closure__ or ():
        try:
            _value_digest(h, cell.cell_contents, depth + 1, seen)
        except ValueError:  # an empty cell
            h.update(b"<empty>")


def _class_digest(h, cls: type, depth: int = 0, seen: dict | None = None) -> None:
    """The code of a class's methods outside torch and Python (a changed forward() or loss is another
    model or task, whatever its parameters)."""
    h.update(f"{cls.__module__}.{cls.__qualname__}".encode())
    for klass in cls.__mro__:
        if klass.__module__.split(".")[0] in ("torch", "builtins", "fimoda_kernels"):
            continue
        for name, attr in sorted(vars(klass).items()):
            attr = getattr(attr, "__func__", attr)  # staticmethod / classmethod
            if isinstance(attr, types.FunctionType):
                h.update(name.encode())
                _function_digest(h, attr, depth + 1, seen)


def _task_id(task: Task) -> str:
    """The loss in the checkpoint fingerprint: a built-in task's name, else its class and a digest of its
    code and settings (two custom Tasks must not share a checkpoint; the same one must resume in a new
    process)."""
    name = getattr(task, "name", None)
    if type(task).__module__ == Task.__module__ and name:
        return name
    h = hashlib.sha256()
    _value_digest(h, task)
    cls = type(task)
    return f"{cls.__module__}.{cls.__qualname__} {h.hexdigest()[:16]}"


def _model_code_id(model: nn.Module) -> str:
    """Digest of the code of the model's module classes defined outside torch (their forward and the
    methods it calls): repr(model) and the parameter values do not show a changed forward()."""
    h = hashlib.sha256()
    for cls in sorted({type(m) for m in model.modules()}, key=lambda c: f"{c.__module__}.{c.__qualname__}"):
        _class_digest(h, cls)
    return h.hexdigest()[:16]


def _check_start(base: nn.Module, task: Task, x: torch.Tensor, y: torch.Tensor, dtype, max_memory: int,
                 names: list) -> tuple[float, int, list]:
    """One training-mode pass over the training set at the given model, in chunks of samples whose
    forward and backward fit ``max_memory`` (at most 4096). Refuses a forward that draws random numbers
    (each run of the sequential protocol would need its own global generator state) or writes a buffer
    (running statistics, power iterations, caches: each run would need its own copy), in place (the
    version counter moves, even to the same values), through ``.data`` (the values move), by assigning
    a new tensor or None, or by registering one (refused also when the write broke the pass itself; the
    generators are restored, ``base`` is then discarded). Then the loss gradient must be
    finite (badly scaled data, a finite input whose loss or gradient overflows the dtype, is named here,
    not blamed on the learning rate later). Returns the largest training loss and its sample, for the
    divergence message, and the parameters of ``names`` that no training sample's loss reaches
    (``torch.optim`` skips a parameter without ``.grad``: no weight decay, no momentum; so does further
    training)."""
    named = dict(base.named_parameters())
    params = [named[n] for n in names]
    per_sample = torch.empty((), dtype=dtype).element_size() * (3 * activation_numel(base, x) + x[0].numel())
    chunk = max(1, min(4096, max_memory // per_sample))
    worst, reached, bad_loss, bad_grad = (float("-inf"), 0), [False] * len(params), None, None

    def buffers():  # None entries too: a buffer set to None, or registered later, is a write
        return {f"{prefix}{'.' if prefix else ''}{k}": b for prefix, m in base.named_modules()
                for k, b in m._buffers.items()}

    saved = {n: (b, None if b is None else b.clone(), None if b is None else b._version)
             for n, b in buffers().items()}
    failure = None
    with _watch_rng(x.device) as drew:
        base.train()
        try:
            for a in range(0, x.shape[0], chunk):
                with torch.enable_grad():
                    _, loss = _probe_loss(base, task, "train", x[a:], y[a:], chunk, first=a, whole=y)
                    grads = torch.autograd.grad(loss.mean(), params, allow_unused=True)
                reached = [r or g is not None for r, g in zip(reached, grads)]
                if bad_loss is None and not all_finite(loss):
                    bad_loss = a + int((~torch.isfinite(loss)).nonzero()[0])
                if bad_grad is None and not all(all_finite(g) for g in grads if g is not None):
                    bad_grad = (a, min(x.shape[0], a + chunk) - 1)
                top = int(loss.argmax())
                worst = max(worst, (float(loss[top].detach()), a + top))
        except torch.OutOfMemoryError:
            raise
        except Exception as e:  # a buffer write or a random draw may be what broke it: say so first
            failure = e
        base.eval()
    now = buffers()

    def moved(n):
        if n not in saved or n not in now or now[n] is not saved[n][0]:
            return True  # registered, dropped, re-assigned or set to None
        return now[n] is not None and (now[n]._version != saved[n][2] or not torch.equal(now[n], saved[n][1]))

    changed = sorted(filter(moved, set(saved) | set(now)))
    if drew[0]:
        raise ValueError("model: its training-mode forward draws random numbers (e.g. F.dropout); the runs "
                         "would depend on the global generator, not only on their seeds: remove the random "
                         "ops or make them depend on self.training") from failure
    if changed:
        raise ValueError(f"model: its training-mode forward updates the buffers {', '.join(changed)} (running "
                         f"statistics, power iterations, caches, ...); further training shares buffers between "
                         f"the runs: train without those updates (e.g. track_running_stats=False)") from failure
    if failure is not None:
        raise failure
    if bad_loss is not None:
        raise ValueError(f"train: the loss of training sample {bad_loss} at the given model is not finite in "
                         f"{dtype}; check the scale of the training data")
    if bad_grad is not None:
        raise ValueError(f"train: the loss gradient of training samples {bad_grad[0]}–{bad_grad[1]} at the given "
                         f"model is not finite in {dtype}; check the scale of the training data")
    return worst[0], worst[1], [n for n, r in zip(names, reached) if not r]


_INDEX_DTYPES = (torch.int64, torch.int32)  # what nn.Embedding takes


def _check_pair(name: str, pair) -> tuple[torch.Tensor, torch.Tensor]:
    """The pair, detached (a graph back to the data would make every gradient require grad) and, for
    tensors made under ``torch.inference_mode``, cloned (autograd cannot save those)."""
    if not isinstance(pair, (tuple, list)) or len(pair) != 2:
        raise TypeError(f"{name}: expected an (inputs, targets) pair of tensors, got {type(pair).__name__}")
    x, y = pair
    check_tensor(f"{name}[0] (inputs)", x, ndim=range(1, 10))
    check_tensor(f"{name}[1] (targets)", y, ndim=range(1, 10), device=x.device)
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"{name}: inputs and targets must have the same number of samples, got "
                         f"{x.shape[0]} and {y.shape[0]}")
    if not (x.dtype.is_floating_point or x.dtype in _INDEX_DTYPES):
        raise TypeError(f"{name}[0] (inputs): expected a floating-point tensor (or int64/int32 indices, "
                        f"e.g. token ids for an nn.Embedding), got {x.dtype}")
    return tuple(t.clone() if t.is_inference() else t.detach() for t in (x, y))


def _probe_loss(base: nn.Module, task: Task, name: str, x: torch.Tensor, y: torch.Tensor, n: int,
                first: int = 0, whole: torch.Tensor | None = None):
    """(outputs, per-sample losses) of samples [:n] of ``x, y`` (samples ``first``.. of the argument
    ``name``, whose targets are ``whole``, default ``y``), the argument named where it does not fit:
    integer inputs the model cannot take or that index past an embedding (CPU: on CUDA that is a
    device-side assert), targets a built-in loss refuses (with their whole shape). A custom loss's own
    errors pass through, and so does running out of memory."""
    try:
        out = base(x[:n])
    except torch.OutOfMemoryError:
        raise
    except IndexError as e:
        if x.is_floating_point():
            raise
        sizes = [m.num_embeddings for m in base.modules() if isinstance(m, (nn.Embedding, nn.EmbeddingBag))]
        ids = x[:n].reshape(x[:n].shape[0], -1)  # [N] inputs (one token each) too
        rows = (ids < 0).any(1)
        if sizes:
            rows |= (ids >= max(sizes)).any(1)
        rows = (rows.nonzero().flatten()[:5] + first).tolist()
        where = f"samples {rows}" if rows else f"samples {first}–{first + x[:n].shape[0] - 1}"
        raise ValueError(f"{name}[0] (inputs): {where}: {e} (token ids past an embedding's size?)") from e
    except (RuntimeError, TypeError) as e:
        if x.is_floating_point():
            raise
        raise TypeError(f"{name}[0] (inputs): the model fails on these {x.dtype} inputs ({e}); integer inputs "
                        f"are token ids for an nn.Embedding, other features must be floating point") from e
    try:
        return out, task.loss(out, y[:n])
    except torch.OutOfMemoryError:
        raise
    except (ValueError, TypeError, RuntimeError) as e:
        if type(task) not in (MSETask, CrossEntropyTask):
            raise
        hint = ""
        if type(task) is MSETask and out.dim() > 1 and out.shape[-1] > 1:
            hint = "; for class labels use loss='cross_entropy'"
        y = y if whole is None else whole
        raise ValueError(f"{name}[1] (targets): shape {tuple(y.shape)} ({y.dtype}) does not fit the model's outputs "
                         f"(shape {tuple(out.shape[1:])} per sample) under loss {task!r}: {e}{hint}") from e


def _rng_states(device: torch.device) -> list:
    states = [torch.get_rng_state()]
    if device.type == "cuda":
        states.append(torch.cuda.get_rng_state(device))
    return states


@contextlib.contextmanager
def _watch_rng(device: torch.device):
    """Yields a list that holds, after the block, whether the block drew from the global generators
    (CPU, and the device's); their states are restored."""
    drew = []
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        before = _rng_states(device)
        yield drew
        drew.append(any(not torch.equal(a, b) for a, b in zip(before, _rng_states(device))))


def _wide_losses(base: nn.Module, task: Task, x: torch.Tensor, y: torch.Tensor, dtype) -> bool:
    """Whether the test losses are computed in float64 from the outputs (see :func:`_test_loss`): for
    the built-in losses, and for a custom one that takes float64 outputs of the whole test set (else, in
    float32 training, a warning). Every test input goes through the model once here, in eval mode with
    the generators watched (a bad input or a random draw is named now, not at the first evaluation)."""
    with torch.no_grad(), _watch_rng(x.device) as drew:
        base.eval()
        out, _ = _probe_loss(base, task, "test", x, y, x.shape[0])
    if drew[0]:
        raise ValueError(_EVAL_RANDOM)
    if type(task) in (MSETask, CrossEntropyTask):
        return True
    with torch.no_grad():
        try:
            wide = task.loss(_f64(out), _f64(y)).dtype == torch.float64
        except torch.OutOfMemoryError:
            raise
        except (RuntimeError, TypeError, ValueError):
            wide = False
    if not wide and dtype != torch.float64:
        warnings.warn(f"further_train: loss {task!r} does not take float64 outputs; the test losses are computed "
                      f"in {dtype}, whose rounding limits the gold scores of confidently predicted points",
                      stacklevel=4)
    return wide


def _autograd_on(fn):
    """Run ``fn`` with autograd available whatever the caller's mode (``no_grad``, ``inference_mode``):
    training differentiates the loss."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with torch.inference_mode(False), torch.enable_grad():
            return fn(*args, **kwargs)
    return wrapper


@_autograd_on
def further_train(model: nn.Module, train, test, loo_indices, seeds, epochs: int | None = None,
                  steps: int | None = None, optimizer: str = "sgd", lr: float | None = None,
                  batch_size: int | None = None, momentum: float = 0.0, weight_decay: float = 0.0,
                  mode: str = "remove", eval_every="epoch", dtype: torch.dtype = torch.float32, device=None,
                  max_memory: int = 2**30, checkpoint_dir=None, loss="mse", progress=True,
                  betas: Sequence[float] = (0.9, 0.999), eps: float = 1e-8, path: str | None = None,
                  models_per_chunk: int | None = None) -> FurtherTrainingResult:
    """Leave-one-out further training of every (model, seed) run at once (module docstring, MATH.md §2).

    Args:
        model: the final model θ* (an nn.Module; not modified). Its per-sample losses must not depend on
            the other samples of a batch (no BatchNorm in training, no Dropout), and its training
            forward must neither draw random numbers nor update buffers (both refused). Parameters no
            training sample's loss reaches are not updated, as ``torch.optim`` skips them (no weight
            decay); one reached by some samples only is updated every step, which differs from
            ``torch.optim`` with momentum, weight decay or Adam(W) (see docs/DESIGN.md).
        train, test: ``(inputs, targets)`` pairs; inputs ``[N, ...]`` floating point (cast to ``dtype``)
            or int64/int32 indices (token ids; generic path), targets ``[N]`` (class indices for
            "cross_entropy", reals for "mse"; ``[N, 1]`` also for "mse").
        loo_indices: distinct training indices in [0, N) to leave out (model 1 + j leaves out the j-th).
        seeds: distinct non-negative integer seeds (one generator per run, see the module docstring).
        epochs / steps: exactly one: number of epochs, or of optimizer steps per run.
        optimizer: "sgd" (``torch.optim.SGD``: momentum, weight_decay), "adam" (L2 weight decay) or
            "adamw" (decoupled); ``betas`` and ``eps`` for the Adam family. lr > 0, batch_size >= 1.
        mode: "remove" or "downweight".
        eval_every: "epoch" (with ``epochs``) or an int k (with ``steps``): evaluate after every k steps
            and after the last one.
        dtype: float32 or float64 for parameters and arithmetic (inputs are cast). device: default
            the model's.
        max_memory: bytes for one chunk of models (parameters, gradients, state, activations). On a
            GPU give it more than the default: a step of a few thousand small models leaves the device
            mostly idle (launch-bound), so all of a study's models in one chunk run far faster (the
            paper's Energy study, 10 100 models of 8→128→128→1, is one chunk at about 10 GiB).
        checkpoint_dir: where to checkpoint after each chunk, and inside a chunk every 10 minutes at an
            evaluation point (and resume from); None: no checkpoint.
        loss: "mse" (ℓ = (f − y)², nn.MSELoss per sample), "cross_entropy" (nn.CrossEntropyLoss per
            sample) or a :class:`~fimoda_kernels.tasks.Task` (its ``loss`` gives per-sample losses; test
            losses are computed from float64 outputs when it takes them, else in ``dtype``, with a warning).
        progress: True for a tqdm bar (models·steps/s), False for none, or a callable receiving a
            dict(done=, total=, chunk=, chunks=) after each chunk (an exception raised there stops the
            run after the chunk's checkpoint).
        path: None (fused when the model is an MLP the fused path supports, else generic), "fused" or
            "generic". models_per_chunk: cap on the models trained together (default: memory-bounded;
            at most 64 on CPU, see _CPU_MODELS_PER_CHUNK).

    Returns:
        :class:`FurtherTrainingResult`.
    """
    # ---- validation
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError("model: expected at least one parameter with requires_grad=True, got none")
    x_tr, y_tr = _check_pair("train", train)
    x_te, y_te = _check_pair("test", test)
    N = x_tr.shape[0]
    if N < 2:
        raise ValueError(f"train: expected at least 2 samples, got {N}")
    if x_te.shape[0] == 0:
        raise ValueError("test: expected at least one test point, got 0")
    if x_te.shape[1:] != x_tr.shape[1:]:
        raise ValueError(f"test[0] (inputs): expected samples of shape {tuple(x_tr.shape[1:])} (as train), "
                         f"got {tuple(x_te.shape[1:])}")
    loo_indices = check_int_list("loo_indices", loo_indices, min_value=0, max_value=N - 1)
    seeds = check_int_list("seeds", seeds, min_value=0, max_value=2**64 - 1)  # torch.Generator seeds
    if (epochs is None) == (steps is None):
        raise ValueError(f"epochs, steps: expected exactly one of them, got epochs={epochs!r}, steps={steps!r}")
    epochs = None if epochs is None else check_int("epochs", epochs, min_value=1)
    steps = None if steps is None else check_int("steps", steps, min_value=1)
    optimizer = check_choice("optimizer", optimizer, ("sgd", "adam", "adamw"))
    if lr is None:
        raise ValueError("lr: expected a learning rate > 0, got None")
    lr, momentum, weight_decay, betas, eps = check_hyperparameters(optimizer, lr, momentum, weight_decay, betas, eps)
    if batch_size is None:
        raise ValueError("batch_size: expected an integer >= 1, got None")
    batch_size = check_int("batch_size", batch_size, min_value=1)
    mode = check_choice("mode", mode, ("remove", "downweight"))
    if eval_every == "epoch":
        if epochs is None:
            raise ValueError("eval_every: 'epoch' needs epochs=; with steps= give an int number of steps")
        eval_steps = None
    else:
        eval_steps = check_int("eval_every", eval_every, min_value=1)
        if steps is None:
            raise ValueError(f"eval_every: an int ({eval_steps}) needs steps=; with epochs= use 'epoch'")
    if dtype not in (torch.float32, torch.float64):
        raise TypeError(f"dtype: expected torch.float32 or torch.float64, got {dtype!r}")
    device = torch.device(device) if device is not None else named[0][1].device
    if device.type == "meta":
        raise ValueError("device: expected a device that computes (cpu, cuda, ...), got 'meta'")
    if checkpoint_dir is not None and Path(checkpoint_dir).exists() and not Path(checkpoint_dir).is_dir():
        raise ValueError(f"checkpoint_dir: expected a directory, got the file {str(checkpoint_dir)!r}")
    max_memory = check_int("max_memory", max_memory, min_value=1)
    task = get_task(loss, arg="loss")
    if path is not None:
        check_choice("path", path, ("fused", "generic"))
    if models_per_chunk is not None:
        models_per_chunk = check_int("models_per_chunk", models_per_chunk, min_value=1)
    if not (isinstance(progress, bool) or callable(progress)):
        raise TypeError(f"progress: expected a bool or a callable, got {type(progress).__name__}")

    base = copy.deepcopy(model).to(device=device, dtype=dtype)
    problems = [f"{name}: {why}" for name, _, why in batch_dependent_modules(base)]  # trained in train mode
    problems += [f"{name}: sparse=True (dense gradients are batched)" for name in sparse_embeddings(base)]
    if problems:
        raise ValueError("model: the sequential protocol cannot be batched for it: " + "; ".join(problems))
    x_tr, x_te = (x.to(device=device, dtype=dtype if x.is_floating_point() else x.dtype) for x in (x_tr, x_te))
    y_tr, y_te = y_tr.to(device), y_te.to(device)
    if y_tr.is_floating_point():
        y_tr, y_te = y_tr.to(dtype), y_te.to(dtype)
    for name, t in (("train[0] (inputs)", x_tr), ("train[1] (targets)", y_tr), ("test[0] (inputs)", x_te),
                    ("test[1] (targets)", y_te)):  # after the cast: float64 data may overflow float32
        if t.is_floating_point() and not all_finite(t):
            raise ValueError(f"{name}: expected finite values in {dtype}, got NaN or Inf")
    with torch.no_grad(), _watch_rng(device) as drew:
        base.eval()  # model/targets/loss compatibility on two samples (the test set: _wide_losses)
        logits, probe = _probe_loss(base, task, "train", x_tr, y_tr, 2)
    if drew[0]:
        raise ValueError(_EVAL_RANDOM)
    if probe.shape != (2,):
        raise ValueError(f"loss: expected one loss per sample, got shape {tuple(probe.shape)} for 2 samples")
    if isinstance(task, CrossEntropyTask):  # all labels, once (the training steps index without checks)
        C = logits.shape[-1]
        for name, y in (("train", y_tr), ("test", y_te)):
            lo, hi = (int(y.min()), int(y.max())) if y.numel() else (0, 0)
            if lo < 0 or hi >= C:
                raise ValueError(f"{name}[1] (targets): expected class indices in [0, {C}) (the model's "
                                 f"{C} outputs), got values in [{lo}, {hi}]")

    for name, t in list(base.named_parameters()) + list(base.named_buffers()):
        if t.is_floating_point() and not all_finite(t):
            raise ValueError(f"model: {name} holds NaN or Inf (in {dtype})")
    worst_loss, worst_sample, unused = _check_start(base, task, x_tr, y_tr, dtype, max_memory, [n for n, _ in named])
    if len(unused) == len(named):
        raise ValueError("model: no trainable parameter gets a gradient from the training loss")
    named = [(n, p) for n, p in named if n not in unused]
    wide = _wide_losses(base, task, x_te, y_te, dtype)

    mlp = mlp_layers(base)
    if not isinstance(mlp, str) and (x_tr.dim() != 2 or not x_tr.is_floating_point()):
        mlp = f"the fused path takes [N, features] floating-point inputs, got {tuple(x_tr.shape)} {x_tr.dtype}"
    if path == "fused" and isinstance(mlp, str):
        raise ValueError(f"path: 'fused' needs an MLP: {mlp}")
    use_fused = path != "generic" and not isinstance(mlp, str)
    if use_fused:
        mlp = [(lin, _activation(act) if act is not None else None) for lin, act in mlp]

    # ---- config, fingerprint, plan
    n_models = len(loo_indices) + 1
    config = dict(optimizer=optimizer, lr=lr, batch_size=batch_size, momentum=momentum,
                  # SGD ignores betas and eps: they must not keep a checkpoint from resuming
                  betas=list(betas) if optimizer != "sgd" else None, eps=eps if optimizer != "sgd" else None,
                  mode=mode, epochs=epochs, steps=steps, eval_every="epoch" if eval_steps is None else eval_steps,
                  dtype=str(dtype).replace("torch.", ""), loss=_task_id(task), model=repr(base),
                  model_code=_model_code_id(base),
                  parameters=[n for n, _ in named],
                  loo_indices=loo_indices, seeds=seeds, n_train=N, n_test=x_te.shape[0],
                  path="fused" if use_fused else "generic", device=device.type)
    h = hashlib.sha256()
    # every parameter (frozen ones too) and buffer, with its name: the model's values, not only its shape
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        h.update(f"{name}:{t.requires_grad}".encode())
        _tensor_digest(h, t)
    for t in (x_tr, y_tr, x_te, y_te):
        _tensor_digest(h, t)
    config["data_sha256"] = h.hexdigest()

    itemsize = torch.finfo(dtype).bits // 8
    P = sum(p.numel() for _, p in named)
    n_state = (optimizer != "sgd") + (optimizer != "sgd" or momentum != 0)
    act = activation_numel(base, x_tr)
    width = batch_size + (mode == "downweight")
    per_model = itemsize * (P * (2 + n_state + (0 if use_fused else 3))
                            + act * (3 * width + x_te.shape[0]) + x_tr[0].numel() * width)
    fit = max(1, max_memory // per_model)
    cap = models_per_chunk or (_CPU_MODELS_PER_CHUNK if device.type == "cpu" else fit)
    chunk = min(fit, cap)
    config["models_per_chunk"] = chunk
    pairs = [(r, j) for r in range(len(seeds)) for j in range(n_models)]  # seed-major
    chunks = [pairs[a:a + chunk] for a in range(0, len(pairs), chunk)]

    if epochs is not None:
        eval_points = list(range(epochs + 1))
    else:
        eval_points = [0] + [s for s in range(eval_steps, steps + 1, eval_steps)]
        if eval_points[-1] != steps:
            eval_points.append(steps)
    eval_unit = "epoch" if epochs is not None else "step"
    losses = torch.full((len(eval_points), x_te.shape[0], n_models, len(seeds)), float("nan"), dtype=torch.float64)
    done = torch.zeros(n_models, len(seeds), dtype=torch.bool)

    ckpt = None
    if checkpoint_dir is not None:
        Path(checkpoint_dir).mkdir(parents=True, exist_ok=True)  # after validation, before any training
        ckpt = Path(checkpoint_dir) / _CHECKPOINT_NAME
        if ckpt.exists():
            state = torch.load(ckpt, map_location="cpu", weights_only=True)
            if state.get("format") != _FORMAT:
                raise ValueError(f"checkpoint_dir: {ckpt} was written by another version of further_train "
                                 f"(format {state.get('format')}, this one writes {_FORMAT}); use another directory")
            saved = json.loads(state["config_json"])
            # the chunking may differ: each model's result does not depend on its chunk
            diff = sorted(k for k in set(saved) | set(config)
                          if saved.get(k) != config.get(k) and k != "models_per_chunk")
            if diff:
                raise ValueError(f"checkpoint_dir: {ckpt} was written by a run with different arguments "
                                 f"(differing: {', '.join(diff)}); use another directory or the same arguments")
            losses, done = state["losses"], state["done"]

    # ---- run
    bar = None
    if progress is True:
        from tqdm.auto import tqdm

        nb_full, nb_loo = -(-N // batch_size), -(-(N - (mode == "remove")) // batch_size)
        per_run = [steps] * 2 if steps is not None else [nb_full * epochs, nb_loo * epochs]
        todo = sum(per_run[j > 0] for (r, j) in pairs if not bool(done[j, r]))
        bar = tqdm(total=todo, unit="model·step", unit_scale=True, desc="further training", dynamic_ncols=True)
    try:
        for ci, pairs_c in enumerate(chunks):
            if all(bool(done[j, r]) for r, j in pairs_c):
                continue
            seeds_c = [seeds[r] for r, _ in pairs_c]
            loo_c = [-1 if j == 0 else loo_indices[j - 1] for _, j in pairs_c]
            sched = _Schedule(N, batch_size, mode, epochs, steps, eval_steps, seeds_c, loo_c, dtype, device)
            partial = None if ckpt is None else _Partial(ckpt.with_name(_PARTIAL_NAME),
                                                         json.dumps(config, sort_keys=True), pairs_c)
            out = _train_chunk(base, named, mlp if use_fused else None, sched, task, wide, x_tr, y_tr, x_te,
                               y_te, optimizer, lr, momentum, weight_decay, betas, eps, bar, partial)
            # losses are float64; one past the training dtype's range counts as overflowed, as it would
            # have in that dtype (NaN compares false: out of range too)
            in_range = out.abs() <= torch.finfo(dtype).max
            if not bool(in_range[0].all()):  # before any step: not the learning rate
                raise ValueError(f"model: the test losses of the given model (t = 0) are not finite in {dtype}; "
                                 "check the model's outputs and the test data")
            if not bool(in_range.all()):
                bad = torch.nonzero(~in_range.all(0).all(0))[0].item()
                r, j = pairs_c[bad]
                raise FurtherTrainingDivergedError(
                    f"lr: further training diverged (non-finite test loss) for seed {seeds[r]}, "
                    f"model {j} ({'full data' if j == 0 else f'leaving out {loo_indices[j - 1]}'}) "
                    f"with lr={lr}; lower the learning rate, or check the scale of the data (the "
                    f"largest training loss at the given model: {worst_loss:.3g}, sample {worst_sample})")
            out = out.cpu()  # one device-to-host copy per chunk, not one per model
            for m, (r, j) in enumerate(pairs_c):
                losses[:, :, j, r] = out[:, :, m]
                done[j, r] = True
            if ckpt is not None:
                _atomic_save(dict(format=_FORMAT, config_json=json.dumps(config, sort_keys=True),
                                  losses=losses, done=done), ckpt)
                partial.path.unlink(missing_ok=True)  # the chunk is in the checkpoint now
            if callable(progress):
                progress(dict(done=int(done.sum()), total=done.numel(), chunk=ci, chunks=len(chunks)))
    finally:
        if bar is not None:
            bar.close()
    return FurtherTrainingResult(losses, eval_points, eval_unit, loo_indices, seeds, config)


def _train_chunk(base, named, mlp, sched: _Schedule, task, wide, x_tr, y_tr, x_te, y_te, optimizer, lr,
                 momentum, weight_decay, betas, eps, bar, partial: _Partial | None = None) -> torch.Tensor:
    """Train the chunk's models (from ``partial``'s saved state where it has one, saving to it as it
    goes); test losses [n_evals, n_test, M]."""
    M, dtype, device = sched.M, sched.dtype, x_tr.device
    flat = _FlatParams(named, M, dtype, device)
    if mlp is not None:
        pos = {n: k for k, (n, _) in enumerate(named)}  # named: the caller's model; mlp: base's modules
        engine = _FusedMLP(mlp, flat, sched.width, {id(p): pos[n] for n, p in base.named_parameters() if n in pos})
    else:
        buffers = {n: b for n, b in base.named_buffers()}
        engine = _Generic(base, flat, buffers)
    s1, s2 = state_buffers(optimizer, momentum, flat.theta)
    step = torch.zeros(M, dtype=torch.int64, device=device)
    update = EnsembleStepper(optimizer, lr, momentum, weight_decay, betas, eps, segments=flat.segments,
                             device=device, dtype=dtype, max_step=sched.n_steps())
    evals, start = [], 0
    saved = partial.load() if partial is not None else None
    if saved is not None:
        for t, name in ((flat.theta, "theta"), (s1, "state1"), (s2, "state2"), (step, "step")):
            if t is not None:
                t.copy_(saved[name])
        evals, start = list(saved["evals"].to(device)), saved["global_step"]
    else:
        with torch.no_grad():
            evals.append(engine.test_losses(x_te, y_te, task, wide).T)
    for s, (idx, w, active, evaluate, n_active) in enumerate(sched.steps(count=bar is not None, start=start),
                                                             start + 1):
        if mlp is not None:
            with torch.no_grad():
                engine.grad(x_tr, y_tr, task, idx, w)
        else:
            engine.grad(x_tr, y_tr, task, idx, w)
        step += 1 if active is None else active.to(torch.int64)
        with torch.no_grad():
            update(flat.theta, flat.grad, step, s1, s2, active)
            if evaluate:
                evals.append(engine.test_losses(x_te, y_te, task, wide).T)
                if partial is not None and partial.due():
                    partial.save(s, dict(theta=flat.theta, state1=s1, state2=s2, step=step, evals=torch.stack(evals)))
        if bar is not None:
            bar.update(n_active)
    return torch.stack(evals)
