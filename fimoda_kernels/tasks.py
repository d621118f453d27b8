"""Tasks: how a model's output becomes the scalar output f and the loss ℓ = φ(f; y) (MATH.md §1).

A task turns a batch of model outputs ``model_out`` (sample dimension first) and ``targets`` into

- ``output(model_out, targets) -> f``: the scalar model output per sample, ``Tensor[n]``;
- ``loss(model_out, targets) -> ℓ``: the per-sample loss (no reduction), ``Tensor[n]``;
- ``phi(f, targets)``, ``dloss(f, targets)``, ``d2loss(f, targets)``: φ, φ' and φ'' as functions of f.

Users extend the library by subclassing :class:`Task` and passing an instance wherever a task is
accepted. Every method must treat samples independently and only use shapes of its inputs (no
``.item()``): per-sample gradients call ``output``/``loss`` inside ``torch.func.vmap``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.func import grad, jvp, vmap

from ._validate import FLOAT_DTYPES, check_choice, check_tensor

_INT_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)
_REAL_DTYPES = FLOAT_DTYPES + _INT_DTYPES


def _is_transformed(t: torch.Tensor) -> bool:
    """True inside torch.func transforms, where values cannot be inspected (only shapes)."""
    return torch._C._functorch.is_functorch_wrapped_tensor(t)


def _check_f(f: torch.Tensor) -> torch.Tensor:
    return check_tensor("f", f, ndim=1, dtypes=FLOAT_DTYPES)


def _check_n(targets: torch.Tensor, n: int) -> None:
    if targets.shape[0] != n:
        raise ValueError(f"targets: expected {n} samples along dim 0 (as in the model output), "
                         f"got shape {tuple(targets.shape)}")


class Task:
    """Base class of a loss kind ℓ = φ(f; y). Subclasses implement ``output``, ``phi``, ``dloss``
    and ``d2loss``; ``loss`` defaults to ``phi(output(...))`` and may be overridden for speed."""

    name = "task"

    def output(self, model_out: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Scalar model output f per sample, Tensor[n]."""
        raise NotImplementedError

    def phi(self, f: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Per-sample loss as a function of f, Tensor[n]."""
        raise NotImplementedError

    def dloss(self, f: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """φ'(f; y), Tensor[n]."""
        raise NotImplementedError

    def d2loss(self, f: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """φ''(f; y), Tensor[n]."""
        raise NotImplementedError

    def loss(self, model_out: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Per-sample loss ℓ, Tensor[n] (no reduction)."""
        return self.phi(self.output(model_out, targets), targets)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class MSETask(Task):
    """Regression: f = the prediction, ℓ = (f − y)², φ' = 2(f − y), φ'' = 2.

    ``model_out`` is ``[n]`` or ``[n, 1]``; ``targets`` ``[n]`` or ``[n, 1]`` (real; cast to f's
    dtype). Multi-output regression (``[n, k]``, k > 1) is rejected: f must be one scalar per
    sample, so subclass :class:`Task` and choose it (e.g. one output, or a sum of outputs).
    """

    name = "regression_mse"

    def _targets(self, targets: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
        check_tensor("targets", targets, ndim=(1, 2), dtypes=_REAL_DTYPES)
        if targets.dim() == 2 and targets.shape[1] != 1:
            raise ValueError(f"targets: expected shape [n] or [n, 1], got {tuple(targets.shape)}")
        _check_n(targets, f.shape[0])
        return targets.reshape(f.shape[0]).to(f.dtype)

    def output(self, model_out, targets):
        check_tensor("model_out", model_out, ndim=(1, 2), dtypes=FLOAT_DTYPES)
        if model_out.dim() == 2 and model_out.shape[1] != 1:
            raise ValueError(
                f"model_out: MSETask needs one output per sample (shape [n] or [n, 1]), got shape "
                f"{tuple(model_out.shape)}; for multi-output regression subclass Task and define f")
        f = model_out.reshape(model_out.shape[0])
        self._targets(targets, f)
        return f

    def phi(self, f, targets):
        return (_check_f(f) - self._targets(targets, f)) ** 2

    def dloss(self, f, targets):
        return 2 * (_check_f(f) - self._targets(targets, f))

    def d2loss(self, f, targets):
        self._targets(targets, _check_f(f))
        return torch.full_like(f, 2.0)


class CrossEntropyTask(Task):
    """Classification (TRAK's convention): f = log(p_y / (1 − p_y)) the logit margin,
    ℓ = −log p_y = log(1 + e^{−f}), φ' = −(1 − p_y), φ'' = p_y (1 − p_y), p_y = sigmoid(f).

    ``model_out`` are logits ``[n, C]`` (C ≥ 2); ``targets`` integer class indices ``[n]``. The range
    of the indices is checked on CPU outside torch.func transforms (elsewhere it would cost a
    device sync per call; out-of-range indices then fail inside ``gather`` as in torch).
    """

    name = "classification_ce"

    def _targets(self, targets: torch.Tensor, n: int, classes: int | None = None) -> torch.Tensor:
        check_tensor("targets", targets, ndim=1, dtypes=_INT_DTYPES)
        _check_n(targets, n)
        if (classes is not None and targets.device.type == "cpu" and not _is_transformed(targets)
                and n > 0 and (int(targets.min()) < 0 or int(targets.max()) >= classes)):
            raise ValueError(f"targets: expected class indices in [0, {classes}), got values in "
                             f"[{int(targets.min())}, {int(targets.max())}]")
        return targets.long()

    def _logits(self, model_out, targets):
        check_tensor("model_out", model_out, ndim=2, dtypes=FLOAT_DTYPES)
        if model_out.shape[1] < 2:
            raise ValueError(f"model_out: expected logits [n, C] with C >= 2 classes, got shape "
                             f"{tuple(model_out.shape)}")
        return self._targets(targets, model_out.shape[0], model_out.shape[1])

    def output(self, model_out, targets):
        y = self._logits(model_out, targets)
        logit_y = model_out.gather(1, y[:, None]).squeeze(1)
        # logsumexp over the other classes; a mask (not one_hot) so that it works under vmap
        is_y = torch.arange(model_out.shape[1], device=model_out.device) == y[:, None]
        return logit_y - model_out.masked_fill(is_y, float("-inf")).logsumexp(1)

    def loss(self, model_out, targets):
        return F.cross_entropy(model_out, self._logits(model_out, targets), reduction="none")

    def phi(self, f, targets):
        self._targets(targets, _check_f(f).shape[0])
        return torch.logaddexp(torch.zeros_like(f), -f)  # log(1 + e^{-f}), stable both ways

    def dloss(self, f, targets):
        self._targets(targets, _check_f(f).shape[0])
        return -torch.sigmoid(-f)

    def d2loss(self, f, targets):
        self._targets(targets, _check_f(f).shape[0])
        return torch.sigmoid(f) * torch.sigmoid(-f)


_TASKS = {"mse": MSETask, "regression_mse": MSETask,
          "cross_entropy": CrossEntropyTask, "classification_ce": CrossEntropyTask}


def output_derivatives(task: Task, out: torch.Tensor, y: torch.Tensor, w: torch.Tensor,
                       tangents: torch.Tensor | None = None):
    """g = ∂(Σ_k w_k ℓ_k)/∂out for outputs ``out [*S, C]`` (or ``[*S]``), targets ``y [*S(, ...)]`` and
    weights ``w [*S]``, S any leading sample shape; with ``tangents [*S, r, C]``, also the derivative of
    g along each of the r tangents, ``w_k ∇²_out ℓ_k · t`` (returned as ``(g, Rg)``). Closed forms for
    :class:`MSETask` and :class:`CrossEntropyTask`, autograd / torch.func on the loss otherwise."""
    if type(task) is MSETask:
        f = out.reshape(w.shape)
        g = (2 * (f - y.reshape(w.shape).to(out.dtype)) * w).reshape(out.shape)
        if tangents is None:
            return g
        return g, tangents * (2 * w).reshape(w.shape + (1,) * (tangents.dim() - w.dim()))
    if type(task) is CrossEntropyTask:
        p = torch.softmax(out, -1)
        g = p.clone()
        g.scatter_add_(-1, y[..., None].long(), torch.full_like(g[..., :1], -1.0))
        g.mul_(w[..., None])
        if tangents is None:
            return g
        pr = p[..., None, :]  # (diag(p) − p pᵀ) t per tangent
        Rg = pr * (tangents - (tangents * pr).sum(-1, keepdim=True))
        return g, Rg.mul_(w[..., None, None])
    C = out.shape[w.dim():]

    def weighted(o):
        return (task.loss(o.reshape(-1, *C), y.reshape(-1, *y.shape[w.dim():])).reshape(w.shape) * w).sum()

    if tangents is None:
        o = out.detach().requires_grad_(True)
        with torch.enable_grad():
            return torch.autograd.grad(weighted(o), o)[0]
    g_of = grad(weighted)
    axis = w.dim()  # the tangents' r axis
    Rg = vmap(lambda t: jvp(g_of, (out,), (t,))[1], in_dims=axis, out_dims=axis)(tangents)
    return g_of(out), Rg


def get_task(task: str | Task, arg: str = "task") -> Task:
    """A :class:`Task` instance from a name ("mse"/"regression_mse", "cross_entropy"/
    "classification_ce") or the instance itself; errors name the argument ``arg``."""
    if isinstance(task, Task):
        return task
    if isinstance(task, str):
        return _TASKS[check_choice(arg, task, list(_TASKS))]()
    raise TypeError(f"{arg}: expected a Task instance or one of {list(_TASKS)}, "
                    f"got {type(task).__name__} {task!r}")
