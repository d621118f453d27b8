"""Pieces every attribution method shares: data pairs, eval mode, gradients, the base damping."""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Any

import torch
from torch import nn

from .._validate import all_finite, check_choice, check_int
from ..grads import SampleError, _check_batch, per_sample_grads
from ..inner_products import grad_sq_norms
from ..tasks import Task, get_task


def as_pair(name: str, data) -> tuple[torch.Tensor, torch.Tensor]:
    """``(inputs, targets)`` from a tensor pair or a DataLoader yielding such pairs (concatenated:
    the inputs are held in memory, gradients never are)."""
    if isinstance(data, torch.utils.data.DataLoader):
        xs, ys = [], []
        for batch in data:
            if not isinstance(batch, (tuple, list)) or len(batch) != 2:
                raise TypeError(f"{name}: the DataLoader must yield (inputs, targets) pairs, got "
                                f"{type(batch).__name__}")
            xs.append(batch[0])
            ys.append(batch[1])
        if not xs:
            raise ValueError(f"{name}: the DataLoader yielded no batches")
        return torch.cat(xs), torch.cat(ys)
    if not isinstance(data, (tuple, list)) or len(data) != 2 or not all(isinstance(t, torch.Tensor) for t in data):
        raise TypeError(f"{name}: expected an (inputs, targets) pair of tensors or a DataLoader, "
                        f"got {type(data).__name__}")
    if data[0].shape[0] == 0:
        raise ValueError(f"{name}: expected at least one sample, got 0")
    for what, t in zip(("inputs", "targets"), data):
        if t.device.type == "meta":  # nothing to compute with (the finiteness check would fail obscurely)
            raise ValueError(f"{name}: {what} are on the meta device; expected a device that computes")
        if t.dtype.is_floating_point and not all_finite(t):
            raise ValueError(f"{name}: {what} contain NaN or Inf")
    return data[0], data[1]


@contextlib.contextmanager
def eval_mode(model: nn.Module):
    """Attribution differentiates the model as evaluated (dropout off, batch-norm statistics fixed)."""
    was = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was)


@dataclasses.dataclass
class Options:
    """Fields every method accepts.

    Attributes:
        max_memory: bytes for one chunk of per-sample work (activations, materialized gradients).
        backend: kernel backend ("cuda", "triton", "cpu", "torch" or None = fastest available).
    """
    max_memory: int = 2**30
    backend: str | None = None

    def validate(self) -> "Options":
        self.max_memory = check_int("max_memory", self.max_memory, min_value=1)
        if self.backend is not None:
            from .._dispatch import BACKENDS
            check_choice("backend", self.backend, BACKENDS)
        return self


def make_options(cls, method: str, options: dict[str, Any]):
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(options) - set(names))
    if unknown:
        raise TypeError(f"{method}: unknown option(s) {unknown}; {cls.__name__} accepts {names}")
    return cls(**options).validate()


@contextlib.contextmanager
def _naming(name: str):
    """Re-raise a check's ValueError / TypeError (and a torch RuntimeError, as ValueError) with the
    data set's name in front: "targets: ..." alone does not say whether train or test is at fault."""
    try:
        yield
    except torch.OutOfMemoryError:  # not a data error
        raise
    except TypeError as e:
        raise TypeError(f"{name}: {e}") from e
    except (ValueError, RuntimeError) as e:
        raise ValueError(f"{name}: {e}") from e


def _check_against_model(model, task, name: str, x: torch.Tensor, y: torch.Tensor) -> None:
    """The data set ``name`` against the model, cheaply: the batch checks (dtype, finiteness), a no-grad
    forward of two samples (a feature-shape mismatch otherwise surfaces as a bare torch error deep inside a
    method; two, as a model ending in .squeeze() drops the batch dimension of one) and every target
    against the first one's output, broadcast (no further model evaluation)."""
    with _naming(name):
        _check_batch(model, task, x, y, "loss")  # also the inputs' dtype against the model's
    with torch.no_grad(), eval_mode(model):
        try:
            out = model(x[:2])
            out = out[:1] if isinstance(out, torch.Tensor) else out
        except torch.OutOfMemoryError:
            raise
        except RuntimeError as e:
            raise ValueError(f"{name}[0] (inputs): the model rejects a sample of shape {tuple(x.shape[1:])}: "
                             f"{e}") from e
        with _naming(name):
            for i in range(0, y.shape[0], 4096):
                rows = y[i:i + 4096]
                task.output(out.expand(rows.shape[0], *out.shape[1:]) if isinstance(out, torch.Tensor) else out,
                            rows)


def check_problem(model, task, train, test) -> tuple[Task, tuple, tuple | None]:
    task = get_task(task)
    pair_tr = as_pair("train", train)
    _check_against_model(model, task, "train", *pair_tr)
    pair_te = None
    if test is not None:
        pair_te = as_pair("test", test)
        _check_against_model(model, task, "test", *pair_te)
    return task, pair_tr, pair_te


def base_damping(model, task, train, max_memory: int = 2**30) -> float:
    """λ₀ = Σ_i ‖g_i‖² / (N·p), the mean squared entry of the training loss gradients (MATH.md §3,
    the paper code's base damping), computed from factored norms."""
    x, y = train
    norms = grad_sq_norms(model, task, x, y, "loss", max_memory)
    p = sum(numel for numel, _ in norms.values())
    total = sum(float(sq.double().sum()) for _, sq in norms.values())
    return total / (x.shape[0] * p)


def dense_loss_grads(model, task, test, max_memory: int) -> torch.Tensor:
    """Loss gradients of the test points, ``[n_test, p]`` (the test side is materialized: its rows are
    the right-hand sides of the inverse-HVP solves)."""
    try:
        return per_sample_grads(model, task, test[0], test[1], "loss", max_memory)
    except SampleError as e:  # say which set
        raise e.shifted(prefix="test ") from None


def self_chunks(n: int, max_memory: int, row_bytes: int, fn) -> torch.Tensor:
    """score(i, i) ``[n]`` of a method whose self-influence takes each training chunk as its own test
    set: ``fn(start, stop) -> [c]`` for consecutive chunks of about ``max_memory / row_bytes``
    samples (``row_bytes``: what one sample's rows of the chunk's solve hold). Never the n × n scores,
    nor n × p gradients at once."""
    parts = []
    chunk = max(1, max_memory // max(1, row_bytes))
    for start in range(0, n, chunk):
        try:
            parts.append(fn(start, min(n, start + chunk)))
        except SampleError as e:
            raise e.shifted(start) from None
    return torch.cat(parts)


def join_infos(infos: list) -> dict:
    """The solver infos of several chunks as one: 1-D (per-row) tensors concatenated, other tensors
    (e.g. CG's [iterations + 1, rows] residual history) as a list with one entry per chunk, the rest
    from the first chunk."""
    out = dict(infos[0]) if infos else {}
    for key, value in out.items():
        if isinstance(value, torch.Tensor):
            out[key] = torch.cat([i[key] for i in infos]) if value.dim() == 1 else [i[key] for i in infos]
    return out


def outputs(model, task, pair, chunk: int = 4096) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """f, φ'(f) and φ''(f) per sample (no graph), evaluated in chunks."""
    x, y = pair
    fs = []
    with torch.no_grad():
        for i in range(0, x.shape[0], chunk):
            fs.append(task.output(model(x[i:i + chunk]), y[i:i + chunk]))
    f = torch.cat(fs)
    return f, task.dloss(f, y), task.d2loss(f, y)


def flat_params(model: nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def mean_loss_grad(model, task, pair, chunk: int = 4096) -> torch.Tensor:
    """∇R_D(θ) = (1/N) Σ_i ∇ℓ_i as one flat row ``[1, p]`` (named_parameters order)."""
    x, y = pair
    params = flat_params(model)
    total = [torch.zeros_like(p) for p in params]
    for i in range(0, x.shape[0], chunk):
        loss = task.loss(model(x[i:i + chunk]), y[i:i + chunk]).sum()
        for t, g in zip(total, torch.autograd.grad(loss, params)):
            t += g
    return torch.cat([t.flatten() for t in total])[None] / x.shape[0]
