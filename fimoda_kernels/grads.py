"""Model plumbing: per-sample gradients and Linear/Conv2d capture of (a, s) (MATH.md §4).

Conventions shared by everything here:

- The flattened parameter vector θ ∈ R^p is the concatenation of ``p.flatten()`` (row-major) over
  ``model.named_parameters()`` with ``requires_grad=True``, in that order (:func:`param_layout`).
- Samples are independent: the model must treat the batch dimension (dim 0) sample by sample.
  Attribution is done in eval mode — call ``model.eval()`` yourself. Nothing here changes the
  mode; in train mode BatchNorm sees a batch of one and tries to update its running statistics
  under ``vmap`` (an error), and dropout draws a different mask per sample.
"""
from __future__ import annotations

import collections
import functools
import math
import warnings
from dataclasses import dataclass, field
from typing import Iterator, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.module import _global_forward_hooks
from torch.func import functional_call, grad, vmap

from ._dispatch import FallbackWarning
from ._validate import all_finite, check_choice, check_int, check_same_device, check_tensor
from .ops.conv_patches import conv_patches, patches_backend
from .tasks import Task, _is_transformed, get_task

__all__ = ["ParamSlot", "param_layout", "per_sample_grads", "iter_per_sample_grads",
           "CapturedLayer", "UncoveredParam", "LinearCapture", "capture_linear"]

# Bytes per sample and parameter, in units of the parameter itemsize, assumed by the chunking:
# vmap's per-parameter gradients, their concatenation, and autograd intermediates of at most one
# gradient's size. Per-sample activations are not counted.
_GRAD_COPIES = 3


class ParamSlot(NamedTuple):
    """Where one parameter lives in the flattened per-sample gradient."""
    name: str
    offset: int
    numel: int
    shape: torch.Size


def _check_model(model) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    return model


def param_layout(model: nn.Module) -> list[ParamSlot]:
    """``(name, offset, numel, shape)`` of every ``requires_grad`` parameter, in
    ``named_parameters()`` order; offsets index the flattened gradient. Tied parameters appear once."""
    slots, offset = [], 0
    for name, p in _check_model(model).named_parameters():
        if p.requires_grad:
            slots.append(ParamSlot(name, offset, p.numel(), p.shape))
            offset += p.numel()
    return slots


def _check_batch(model, task, inputs, targets, wrt) -> tuple[Task, list[ParamSlot]]:
    """Validation shared by every function that differentiates ``task`` over a batch."""
    slots = param_layout(model)
    task = get_task(task)
    check_tensor("inputs", inputs)
    check_tensor("targets", targets)
    if inputs.dim() == 0:
        raise ValueError("inputs: expected a batch with the sample dimension first, got a 0-D tensor")
    if targets.dim() == 0 or targets.shape[0] != inputs.shape[0]:
        raise ValueError(f"targets: expected {inputs.shape[0]} samples along dim 0 (inputs.shape[0]), "
                         f"got shape {tuple(targets.shape)}")
    check_choice("wrt", wrt, ("loss", "output"))
    if not slots:
        raise ValueError("model: expected at least one parameter with requires_grad=True, got none")
    for name, t in (("inputs", inputs), ("targets", targets)):  # NaN in, NaN scores out: refuse it here
        if t.is_floating_point():
            bad = ~torch.isfinite(t.flatten(1) if t.dim() > 1 else t[:, None]).all(1)
            if bool(bad.any()):
                raise ValueError(f"{name}: expected finite values, got NaN or Inf at sample "
                                 f"{int(bad.nonzero()[0])}")
    first = next(p for p in model.parameters() if p.requires_grad)
    check_same_device(inputs=inputs, targets=targets, model=first)
    if inputs.is_floating_point() and inputs.dtype != first.dtype:
        raise TypeError(f"inputs: expected dtype {first.dtype} (the model's parameters), got {inputs.dtype}")
    training = [(name, why) for name, m, why in batch_dependent_modules(model) if m.training]
    if training:  # per-sample gradients of a batch-coupled or randomly masked forward mean nothing
        name, why = training[0]
        raise ValueError(f"model: {name} is in training mode ({why}); call model.eval() first")
    sparse = sparse_embeddings(model)
    if sparse:
        raise ValueError(f"model: {sparse[0]} has sparse=True; per-sample gradients are dense rows: "
                         f"construct it with sparse=False")
    return task, slots


def batch_dependent_modules(model: nn.Module) -> list[tuple[str, nn.Module, str]]:
    """(name, module, why) of the modules whose training-mode output depends on the rest of the batch
    or on random draws (BatchNorm, Dropout with p > 0): no per-sample quantity exists for them."""
    out = []
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            out.append((name or "model", m, f"{type(m).__name__} couples the samples of a batch"))
        elif isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0:
            out.append((name or "model", m, f"{type(m).__name__}(p={m.p}) draws random masks"))
    return out


def sparse_embeddings(model: nn.Module) -> list[str]:
    """Names of the trainable nn.Embedding/EmbeddingBag modules with sparse=True (sparse gradients)."""
    return [name or "model" for name, m in model.named_modules()
            if isinstance(m, (nn.Embedding, nn.EmbeddingBag)) and m.sparse and m.weight.requires_grad]


def _evaluate(task: Task, model_out, targets, wrt: str) -> torch.Tensor:
    """The per-sample quantity being differentiated, Tensor[n]."""
    return task.loss(model_out, targets) if wrt == "loss" else task.output(model_out, targets)


def _per_sample_chunks(model, task, inputs, targets, wrt, max_memory, param_names
                       ) -> tuple[list[ParamSlot], torch.dtype, Iterator[tuple[int, torch.Tensor]]]:
    """Validate eagerly, then return (column slots, dtype, lazy generator of chunks)."""
    task, slots = _check_batch(model, task, inputs, targets, wrt)
    max_memory = check_int("max_memory", max_memory, min_value=1)
    if param_names is not None:
        known = {s.name for s in slots}
        wanted = {param_names} if isinstance(param_names, str) else set(param_names)
        if not wanted or not wanted <= known:
            raise ValueError(f"param_names: expected a non-empty subset of the trainable parameters "
                             f"{sorted(known)}, got {sorted(wanted - known) or sorted(wanted)}")
        slots = [s for s in slots if s.name in wanted]
    named = dict(model.named_parameters())
    dtypes = {named[s.name].dtype for s in slots}
    if len(dtypes) != 1 or not next(iter(dtypes)).is_floating_point:
        raise ValueError(f"model: expected trainable parameters of one floating dtype, got {dtypes}")
    dtype = dtypes.pop()
    theta = {s.name: named[s.name].detach() for s in slots}
    # frozen parameters and buffers (e.g. BatchNorm running stats) pass through unchanged
    fixed = {n: t.detach() for n, t in list(named.items()) + list(model.named_buffers())
             if n not in theta}

    def quantity(theta, x, y):
        out = functional_call(model, (theta, fixed), (x.unsqueeze(0),))  # a batch of one
        return _evaluate(task, out, y.unsqueeze(0), wrt).sum()

    batched = vmap(grad(quantity), in_dims=(None, 0, 0), randomness="different")

    def one_by_one(theta, x, y):  # the same gradients without vmap, for models it cannot batch
        gs = [grad(quantity)(theta, x[i], y[i]) for i in range(x.shape[0])]
        return {name: torch.stack([g[name] for g in gs]) for name in theta}

    p = sum(s.numel for s in slots)
    chunk = max(1, max_memory // (_GRAD_COPIES * p * dtype.itemsize))

    def chunks():
        per_sample = batched
        for start in range(0, inputs.shape[0], chunk):
            x, y = inputs[start:start + chunk], targets[start:start + chunk]
            try:
                g = per_sample(theta, x, y)
            except torch.OutOfMemoryError:  # a RuntimeError too, but no reason to go sample by sample
                raise
            except (RuntimeError, NotImplementedError) as e:  # e.g. nn.RNN/GRU/LSTM have no batching rule
                if per_sample is not batched:
                    raise
                warnings.warn(f"per_sample_grads: torch.func.vmap cannot run this model ({type(e).__name__}: "
                              f"{str(e)[:160]}); computing the gradients one sample at a time (slower)",
                              FallbackWarning, stacklevel=2)
                per_sample = one_by_one
                g = per_sample(theta, x, y)
            block = torch.cat([g[s.name].reshape(g[s.name].shape[0], -1) for s in slots], 1)
            if not all_finite(block):
                bad = start + int((~torch.isfinite(block)).any(1).nonzero()[0])
                raise SampleError("inputs, targets: expected finite per-sample gradients, got NaN or Inf", bad,
                                  " (check the inputs, targets and parameters)")
            yield start, block

    return slots, dtype, chunks()


def iter_per_sample_grads(model: nn.Module, task: str | Task, inputs: torch.Tensor,
                          targets: torch.Tensor, wrt: str = "loss", max_memory: int = 2**30,
                          param_names: Sequence[str] | None = None
                          ) -> Iterator[tuple[int, torch.Tensor]]:
    """Per-sample gradients chunk by chunk: yields ``(start, G)`` with ``G[k]`` the flattened
    gradient of sample ``start + k``, ``Tensor[n_chunk, p]`` in the parameters' dtype.

    Arguments (validated on the call, not on the first ``next``) as in :func:`per_sample_grads`.
    Nothing of size n × p is held; the peak is about ``3 · n_chunk · p · itemsize`` plus the
    model's activations for n_chunk samples (not estimated).
    """
    return _per_sample_chunks(model, task, inputs, targets, wrt, max_memory, param_names)[2]


def per_sample_grads(model: nn.Module, task: str | Task, inputs: torch.Tensor,
                     targets: torch.Tensor, wrt: str = "loss", max_memory: int = 2**30,
                     param_names: Sequence[str] | None = None) -> torch.Tensor:
    """Per-sample gradients ``Tensor[n, p]`` (MATH.md §4), rows ∇_θ ℓ_i (``wrt="loss"``) or
    ∇_θ f_i (``wrt="output"``, f from ``task.output``), columns as in :func:`param_layout`.

    Computed as ``vmap(grad(functional_call))`` with each sample run as a batch of one, in the
    model's current mode (call ``model.eval()`` for attribution); buffers and frozen parameters
    pass through ``functional_call`` unchanged. ``task``: a :class:`Task` or its name.
    ``param_names``: restrict the columns to these trainable parameters (concatenated in
    ``named_parameters()`` order), e.g. the ones a :class:`LinearCapture` does not cover.
    Output dtype: the parameters' (all trainable ones must share it).

    Memory: samples are processed in chunks of ``n_chunk = max(1, max_memory // (3 · p · itemsize))``
    (per chunk: vmap's gradient block, its concatenation, autograd intermediates); the peak is
    the returned ``n × p`` matrix plus ``3 · n_chunk · p · itemsize`` plus the activations of
    ``n_chunk`` samples, which the estimate does not see (lower ``max_memory`` for models with
    large activations). Use :func:`iter_per_sample_grads` to avoid the n × p matrix.
    """
    slots, dtype, chunks = _per_sample_chunks(model, task, inputs, targets, wrt, max_memory,
                                              param_names)
    out = torch.empty(inputs.shape[0], sum(s.numel for s in slots), dtype=dtype,
                      device=inputs.device)
    for start, g in chunks:
        out[start:start + g.shape[0]] = g
    return out


# ----------------------------------------------------------------------------- Linear/Conv2d capture

@dataclass(eq=False)
class CapturedLayer:
    """One ``nn.Linear`` / ``nn.Conv2d`` seen by a :class:`LinearCapture`.

    - ``a``: inputs with a trailing column of ones when the layer has a bias; ``[n, d_in(+1)]``
      for a 2-D Linear input (T = 1), else ``[n, T, d_in(+1)]`` (Linear: all middle dims flattened
      into T; Conv2d: the ``unfold`` patches, T = H_out·W_out, d_in = C_in·kh·kw).
    - ``s``: output gradients ``[n, d_out]`` / ``[n, T, d_out]`` (Conv2d: ``[n, H_out·W_out, C_out]``).
    - Per-sample gradient matrix ``G_i = Σ_t s_{i,t} a_{i,t}ᵀ``, ``[d_out, d_in(+1)]``, the bias as its
      last column. Its flat order (row-major) is *not* the ``named_parameters`` order
      (``weight.flatten()`` then ``bias``): convert with :meth:`grad_matrix_to_flat`.
    - ``weight_offset`` / ``bias_offset`` (None without bias): positions in :func:`param_layout`.
    """
    name: str
    module: nn.Module
    weight_offset: int
    bias_offset: int | None
    d_in: int
    d_out: int
    a: torch.Tensor | None = None
    s: torch.Tensor | None = None
    T: int | None = None
    _static_reason: str | None = field(default=None, repr=False)
    _reason: str | None = field(default=None, repr=False)
    _calls: int = field(default=0, repr=False)
    _out: torch.Tensor | None = field(default=None, repr=False)
    _version: int = field(default=0, repr=False)  # _out's version when recorded (in-place changes bump it)
    _in_shape: tuple = field(default=(), repr=False)  # the layer input's shape in the captured forward

    @property
    def has_bias(self) -> bool:
        return self.bias_offset is not None

    @property
    def numel(self) -> int:
        return self.d_out * (self.d_in + self.has_bias)

    def _a_from_input(self, x: torch.Tensor) -> torch.Tensor:
        m = self.module
        if isinstance(m, nn.Conv2d):
            pad = m.padding
            if isinstance(pad, str):  # 'valid' → 0; 'same' (stride 1) may be asymmetric: pad first
                total = [d * (k - 1) for d, k in zip(m.dilation, m.kernel_size)]
                if pad == "same":
                    x = F.pad(x, (total[1] // 2, total[1] - total[1] // 2,
                                  total[0] // 2, total[0] - total[0] // 2))
                pad = 0
            # one native pass on CPU (patches, bias column and all); torch's unfold elsewhere
            return conv_patches(x, m.kernel_size, m.stride, pad, m.dilation, bias=self.has_bias,
                                backend=patches_backend(x))
        else:
            a = x if x.dim() == 2 else x.reshape(x.shape[0], -1, self.d_in)
        return torch.cat([a, a.new_ones(a.shape[:-1] + (1,))], -1) if self.has_bias else a

    def _s_from_grad(self, g: torch.Tensor) -> torch.Tensor:
        if isinstance(self.module, nn.Conv2d):
            return g.flatten(2).transpose(1, 2)
        return g if g.dim() == 2 else g.reshape(g.shape[0], -1, self.d_out)

    def grad_matrix_to_flat(self, G: torch.Tensor) -> torch.Tensor:
        """``[..., d_out, d_in(+1)]`` gradient matrices → ``[..., numel]`` in named_parameters order."""
        w = G[..., :self.d_in].flatten(-2)
        return torch.cat([w, G[..., self.d_in]], -1) if self.has_bias else w

    def flat_to_grad_matrix(self, v: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`grad_matrix_to_flat`: ``[..., numel]`` → ``[..., d_out, d_in(+1)]``."""
        nw = self.d_out * self.d_in
        W = v[..., :nw].unflatten(-1, (self.d_out, self.d_in))
        return torch.cat([W, v[..., nw:, None]], -1) if self.has_bias else W

    def per_sample_grads(self) -> torch.Tensor:
        """Materialized per-sample gradients of this layer's parameters, ``[n, numel]``."""
        if self.a is None or self.s is None:
            raise RuntimeError(f"layer {self.name!r}: no inputs/output gradients recorded; run the "
                               "forward and backward inside the capture (or use LinearCapture.run)")
        a, s = (t if t.dim() == 3 else t.unsqueeze(1) for t in (self.a, self.s))
        return self.grad_matrix_to_flat(torch.einsum("nto,nti->noi", s, a))


class UncoveredParam(NamedTuple):
    """A trainable parameter whose per-sample gradients must be materialized, and why."""
    name: str
    offset: int
    numel: int
    reason: str


_NOT_A_LAYER = "not a weight or bias of an nn.Linear/nn.Conv2d with the stock forward"


def _is_capturable(m: nn.Module) -> bool:
    # subclasses only when they keep the stock forward (also not replaced on the instance), whose
    # (a, s) algebra we know
    return "forward" not in m.__dict__ and any(isinstance(m, c) and type(m).forward is c.forward
                                               for c in (nn.Linear, nn.Conv2d))


class LinearCapture:
    """Records ``a`` and ``s`` (see :class:`CapturedLayer`) for every ``nn.Linear``/``nn.Conv2d`` of
    ``model`` during one forward + backward of a batch; build it with :func:`capture_linear`.

    Either let it run the batch (``param.grad`` is left untouched)::

        cap = capture_linear(model).run(task, inputs, targets, wrt="loss")

    or run it yourself, differentiating the *sum* of the per-sample quantity so that ``s`` is not
    scaled by 1/n (this accumulates into ``param.grad`` as usual)::

        with capture_linear(model) as cap:
            task.loss(model(inputs), targets).sum().backward()

    After the capture, ``cap.layers`` lists the captured layers in module registration order and
    ``cap.uncovered`` the trainable parameters outside them (``UncoveredParam`` with a reason):
    other module types, grouped or non-zero-padded convolutions, partly frozen layers, parameters
    shared between modules, modules called more than once in the forward (reused modules,
    activation checkpointing) or not called at all. A layer whose output did not reach the
    differentiated quantity gets ``s = 0``. Parameters used directly by functional code (e.g.
    ``F.linear(x, self.fc.weight)`` outside ``fc``) cannot be detected: avoid them. Linear layers
    must see the sample dimension first; :meth:`run` checks the leading dimension is n and, where
    another dimension of a layer input also has size n, runs one sample to see which one it is.
    Hooks are removed on exit, also on exceptions; a second backward overwrites ``s``.
    """

    def __init__(self, model: nn.Module):
        self.model = _check_model(model)
        self._slots = {s.name: s for s in param_layout(model)}
        owners = collections.Counter(id(p) for m in model.modules() for p in m.parameters(recurse=False))
        self._records: list[CapturedLayer] = []
        self._owner: dict[str, CapturedLayer] = {}  # parameter name → the record of its layer
        for name, m in model.named_modules():
            if not _is_capturable(m):
                continue
            prefix = f"{name}." if name else ""
            w = self._slots.get(prefix + "weight")
            b = self._slots.get(prefix + "bias")
            reason = None
            if any(owners[id(p)] > 1 for p in m.parameters(recurse=False)):
                reason = "parameter shared with another module"
            elif w is None:
                reason = "weight does not require grad"
            elif m.bias is not None and b is None:
                reason = "bias does not require grad while the weight does"
            elif isinstance(m, nn.Conv2d) and m.groups != 1:
                reason = f"grouped convolution (groups={m.groups})"
            elif isinstance(m, nn.Conv2d) and m.padding_mode != "zeros":
                reason = f"padding_mode={m.padding_mode!r}"
            rec = CapturedLayer(name, m, w.offset if w else -1, b.offset if b else None,
                                d_in=math.prod(m.weight.shape[1:]), d_out=m.weight.shape[0],
                                _static_reason=reason, _reason=reason)
            self._records.append(rec)
            # weight and bias only: another parameter attached to the layer is not used by its forward
            self._owner.update({prefix + n: rec for n in ("weight", "bias") if prefix + n in self._slots})
        self._handles: list = []
        self._active = False
        self._channels_last = any(isinstance(r.module, nn.Conv2d) for r in self._records)  # see run()

    # -- results
    @staticmethod
    def _why_not(rec: CapturedLayer) -> str | None:
        return rec._reason or (None if rec._calls else "module not called in the captured forward")

    @property
    def layers(self) -> list[CapturedLayer]:
        return [r for r in self._records if self._why_not(r) is None]

    @property
    def uncovered(self) -> list[UncoveredParam]:
        out = []
        for s in self._slots.values():
            rec = self._owner.get(s.name)
            reason = self._why_not(rec) if rec is not None else _NOT_A_LAYER
            if reason is not None:
                out.append(UncoveredParam(s.name, s.offset, s.numel, reason))
        return out

    def bytes_per_sample(self) -> int:
        """Bytes of the captured (a, s) of one sample (sizes sample chunks under a budget)."""
        n = self.layers[0].a.shape[0] if self.layers else 1
        return sum((l.a.numel() + l.s.numel()) * l.a.element_size() for l in self.layers) // max(1, n)

    # -- hooks
    def _forward_hook(self, rec: CapturedLayer, module, args, kwargs, out):
        x = args[0] if args else kwargs["input"]
        if _is_transformed(x):  # e.g. per_sample_grads called inside the capture: not ours
            return
        rec._calls += 1
        if rec._calls > 1:
            rec._reason = f"module called {rec._calls} times in one forward"
            rec.a = rec.s = rec._out = None
            return
        if x.dim() < (4 if isinstance(module, nn.Conv2d) else 2):
            rec._reason = f"unbatched input of shape {tuple(x.shape)}"
            return
        rec._in_shape = tuple(x.shape)
        rec.a = rec._a_from_input(x.detach())
        rec.T = 1 if rec.a.dim() == 2 else rec.a.shape[1]
        if out.requires_grad:
            rec._out, rec._version = out, out._version
            self._handles.append(out.register_hook(functools.partial(self._grad_hook, rec)))

    @staticmethod
    def _grad_hook(rec: CapturedLayer, g: torch.Tensor):
        if rec._reason is None:
            rec.s = rec._s_from_grad(g.detach())

    def __enter__(self) -> "LinearCapture":
        if self._active:
            raise RuntimeError("LinearCapture: already active (run() opens the capture itself)")
        self._active = True
        for rec in self._records:
            rec.a = rec.s = rec.T = rec._out = None
            rec._calls, rec._reason = 0, rec._static_reason
            if rec._reason is None and _global_forward_hooks:
                rec._reason = "global module forward hooks are registered (they may replace layer outputs)"
            if rec._reason is None:  # first: a user's hook may replace the output, s must be the layer's
                self._handles.append(rec.module.register_forward_hook(
                    functools.partial(self._forward_hook, rec), with_kwargs=True, prepend=True))
        return self

    def __exit__(self, *exc) -> bool:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._active = False
        layers = self.layers
        if exc[0] is None and any(r.s is not None for r in layers):
            for r in layers:  # a backward ran: the layers it did not reach have s = 0
                if r.s is None:
                    r.s = r.a.new_zeros(r.a.shape[:-1] + (r.d_out,))
        for r in self._records:
            r._out = None  # release the graph
        return False

    def run(self, task: str | Task, inputs: torch.Tensor, targets: torch.Tensor,
            wrt: str = "loss", quantity=None) -> "LinearCapture":
        """Capture one batch: forward ``model(inputs)``, differentiate ``Σ_i ℓ_i`` (``wrt="loss"``)
        or ``Σ_i f_i`` (``wrt="output"``) with respect to the layer outputs only (``param.grad``
        is untouched). ``quantity``: optional ``(model_out, targets) -> Tensor[n]`` differentiated
        instead (e.g. f_i scaled per sample, or the loss at resampled labels). Returns ``self``."""
        task, _ = _check_batch(self.model, task, inputs, targets, wrt)
        if (self._channels_last and inputs.dim() == 4 and inputs.device.type == "cpu"
                and inputs.is_floating_point() and not any(m.training for m in self.model.modules())):
            # CPU convolution nets run ~2× faster in channels_last (torch's NCHW max-pool kernel is 10×
            # slower); the math is the same, the rounding may differ in the last bits. Only in eval mode,
            # where a forward has no side effects to repeat: a model that needs NCHW memory (e.g. .view
            # after a conv) raises, and from then on this capture runs inputs as given.
            try:
                return self._run(task, inputs.contiguous(memory_format=torch.channels_last), targets, wrt,
                                 quantity)
            except RuntimeError:
                self._channels_last = False
        return self._run(task, inputs, targets, wrt, quantity)

    def _run(self, task, inputs, targets, wrt, quantity) -> "LinearCapture":
        if torch.is_inference_mode_enabled():
            raise RuntimeError("capture_linear: cannot differentiate under torch.inference_mode(); call it outside")
        with self, torch.enable_grad():  # an outer no_grad() would leave nothing to capture
            out = self.model(inputs)
            total = (quantity(out, targets) if quantity is not None else _evaluate(task, out, targets, wrt)).sum()
            for r in self.layers:
                if r.a.shape[0] != inputs.shape[0]:
                    r._reason = (f"layer input has {r.a.shape[0]} rows along dim 0, not the "
                                 f"{inputs.shape[0]} samples")
            # the tensor hooks record s as the backward passes each layer. A layer output changed in
            # place afterwards (ReLU(inplace=True), h += x) is another tensor version: a gradient
            # with respect to it would stop above the layer, so ask for the layer's parameter instead
            outs = [r._out if r._out._version == r._version else _a_parameter(r.module)
                    for r in self.layers if r._out is not None]
            if outs and total.requires_grad:
                torch.autograd.grad(total, outs, allow_unused=True)
        self._check_sample_dim(inputs)
        # float32 activations or output gradients that overflowed (an inf activation behind a tanh
        # leaves the loss finite, its s·aᵀ NaN). One sum per tensor (isfinite over every a and s took
        # ~40% of a capture), the exact scan only where the sum is not finite: a loss that overflowed
        # alone, e.g. a squared error past float32's range, leaves finite gradients and is not refused
        for r in self.layers:
            for t, what in ((r.s, "output gradient"), (r.a, "input")):
                if t is None or bool(torch.isfinite(t.sum())):
                    continue
                rows = (~torch.isfinite(t.flatten(1))).any(1)
                if bool(rows.any()):
                    raise SampleError("inputs, targets: expected finite per-sample gradients, got NaN or Inf",
                                      int(rows.nonzero()[0]), f" (the {what} of layer {r.name!r}, {t.dtype})")
        return self

    def _check_sample_dim(self, inputs: torch.Tensor) -> None:
        """Each captured layer's input must hold the samples along dim 0, one row each, in order. n
        rows there can be chance: a time-major model ([T, n, d] with T = n), a tensor made from
        parameters rather than samples ([T, d] with T = n), a model that reorders or mixes the
        samples of a batch; (a, s) would then mix samples silently. A forward of q samples (q = 2, or
        3 when n = 2: never n, and never 1, which .squeeze() would collapse) tells: a layer whose
        input then has another row count, or rows that differ from those samples' rows in the
        batch, is left to the generic path (so is every layer when that forward fails). A reordering
        that keeps the probed samples in place is not seen."""
        layers = self.layers
        n = inputs.shape[0]
        if not layers or n == 0:
            return
        pick = torch.tensor([0, 1] if n > 2 else [0, 1, 0] if n == 2 else [0, 0], device=inputs.device)
        probe = inputs[pick]  # a copy: a model may write its input in place
        seen: dict = {}

        def record(r, module, args, kwargs):
            x = (args[0] if args else kwargs["input"]).detach()
            seen.setdefault(id(r), (x.shape[0], r._a_from_input(x) if x.shape[0] == pick.numel() else None))

        hooks = [r.module.register_forward_pre_hook(functools.partial(record, r), with_kwargs=True) for r in layers]
        try:
            with torch.no_grad():
                self.model(probe)
        except torch.OutOfMemoryError:
            raise
        except Exception as e:  # the generic path runs samples alone: let it decide
            for r in layers:
                r._reason = (f"a forward of {pick.numel()} samples, which checks that the layers see the "
                             f"samples along dim 0, failed ({type(e).__name__}: {str(e)[:120]})")
            return
        finally:
            for h in hooks:
                h.remove()
        for r in layers:
            rows, a = seen.get(id(r), (None, None))
            if a is None:
                r._reason = (f"the samples are not along dim 0 of the layer input (shape {r._in_shape} for "
                             f"{n} samples; {pick.numel()} give {rows} rows)")
            elif a.shape[1:] != r.a.shape[1:] or not _close(a, r.a[pick]):
                r._reason = ("the layer input of a sample differs when it runs without the rest of the "
                             "batch (the model mixes or reorders the samples of a batch)")


def _close(x: torch.Tensor, ref: torch.Tensor) -> bool:
    """x equals ref up to the rounding of a batch-size-dependent evaluation: 1024 ulps of the largest
    finite entry; 5% for half precision and for float32 on a GPU (TF32 matmuls and convolutions round
    to 10 bits); equal infinities and NaN positions match (the finiteness check reports those)."""
    finite = ref[torch.isfinite(ref)]
    loose = ref.dtype in (torch.float16, torch.bfloat16) or (ref.dtype == torch.float32 and ref.device.type != "cpu")
    rel = 0.05 if loose else 1024 * torch.finfo(ref.dtype).eps
    tol = rel * float(finite.abs().max()) if finite.numel() else 0.0
    return bool(torch.isclose(x, ref, rtol=0.0, atol=tol, equal_nan=True).all())


def _a_parameter(module: nn.Module) -> torch.Tensor:
    """A trainable parameter of a captured layer (one exists: frozen layers are not captured)."""
    return next(p for p in module.parameters() if p.requires_grad)


class SampleError(ValueError):
    """A failure of one sample, named by its index; chunk loops shift it into the caller's numbering."""

    def __init__(self, head: str, sample: int, tail: str = ""):
        self.head, self.sample, self.tail = head, sample, tail
        super().__init__(f"{head} for sample {sample}{tail}")

    def __reduce__(self):  # picklable (worker pools), copyable
        return SampleError, (self.head, self.sample, self.tail)

    def shifted(self, offset: int = 0, index=None, prefix: str = "") -> "SampleError":
        """The same failure numbered in a larger set: sample + offset, or ``index[sample]`` for a
        subsample; ``prefix`` names the set (e.g. "test ")."""
        sample = int(index[self.sample]) if index is not None else self.sample + offset
        return SampleError(prefix + self.head, sample, self.tail).with_traceback(self.__traceback__)


def for_sample_chunks(n: int, max_memory: int, fn, first: int = 8) -> None:
    """Call ``fn(start, stop)`` over consecutive sample ranges covering ``range(n)``; ``fn`` returns
    the bytes one sample used, which sizes the following chunks to ``max_memory`` (the first
    chunk, of ``first`` samples, measures it). A :class:`SampleError` from ``fn`` names the sample in
    ``range(n)``, not in its chunk."""
    start, chunk = 0, min(n, first)
    while start < n:
        stop = min(n, start + chunk)
        try:
            per_sample = fn(start, stop)
        except SampleError as e:
            raise e.shifted(start) from None  # the traceback comes along
        start = stop
        chunk = max(1, max_memory // max(1, int(per_sample)))


def capture_linear(model: nn.Module) -> LinearCapture:
    """A :class:`LinearCapture` of ``model``: use as a context manager or call ``.run(...)``."""
    return LinearCapture(model)


def activation_numel(model: nn.Module, x: torch.Tensor) -> int:
    """Values output by every leaf module for one sample (``x[:1]``), the per-sample activation
    estimate the chunking of HVPs and ensemble training sizes its chunks by."""
    total = [0]

    def hook(module, args, out):
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(t, torch.Tensor):
                total[0] += t.numel()

    handles = [m.register_forward_hook(hook) for m in model.modules() if not list(m.children())]
    try:
        with torch.no_grad():
            model(x[:1])
    finally:
        for h in handles:
            h.remove()
    return max(1, total[0])
