"""Backend registry and selection: the op contract of DESIGN.md.

Every op is an :class:`Op` with one implementation per backend. An implementation declares
``unsupported_reasons(*args, **kwargs) -> list[str]`` (empty when it can run these inputs). The
backend's own availability (module built, device present, Triton importable) is checked here once
for all ops. Selection:

- ``backend="name"``: that implementation, or a ``ValueError`` listing every reason it cannot run;
- ``backend=None``: ``FIMODA_BACKEND`` if set (treated like an explicit choice), else the first
  implementation in the device's preference order that can run. Skipping a backend that is
  implemented for the op warns with its reasons, so a slower path is never taken silently.
"""
from __future__ import annotations

import functools
import os
import warnings
from dataclasses import dataclass
from typing import Callable

import torch

from ._ext import _C, C_ERROR, cuda_unavailable_reason

BACKENDS = ("cuda", "triton", "cpu", "torch")
# Automatic choice per device type. Triton on CPU runs only in the interpreter (a test tool,
# orders of magnitude slower), so it is never picked automatically there.
PREFERENCE = {"cuda": ("cuda", "triton", "torch"), "cpu": ("cpu", "torch")}


class FallbackWarning(UserWarning):
    """A faster backend or path exists but cannot run these inputs: a slower one runs instead."""


@functools.lru_cache(maxsize=None)
def _triton_import_error() -> str | None:
    try:
        import triton  # noqa: F401
    except Exception as exc:  # ImportError, or a broken install
        return f"triton not importable ({exc}); pip install 'fimoda_kernels[triton]'"
    return None


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def backend_unavailable_reasons(backend: str, device: torch.device | str) -> list[str]:
    """Why ``backend`` cannot run anything on ``device`` (independent of the op's inputs)."""
    device = torch.device(device)
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {list(BACKENDS)} or None, got {backend!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        no_torch_cuda = [f"torch {torch.__version__} sees no CUDA device"]
        if backend != "cuda":
            return no_torch_cuda
    else:
        no_torch_cuda = []
    if backend == "torch":
        return []
    if backend == "cpu":
        reasons = [] if _C is not None else [C_ERROR]
        if device.type != "cpu":
            reasons.append(f"the cpu backend runs on CPU tensors, got device {device}")
        return reasons
    if backend == "cuda":
        reasons = []
        if device.type != "cuda":
            reasons.append(f"the cuda backend runs on CUDA tensors, got device {device}")
        why = cuda_unavailable_reason()
        if why:
            reasons.append(why)
        return reasons or no_torch_cuda
    if backend == "triton":
        why = _triton_import_error()
        if why:
            return [why]
        if device.type == "cpu" and not triton_interpreting():
            return ["triton on CPU tensors needs TRITON_INTERPRET=1 set before fimoda_kernels is imported"]
        if device.type not in ("cpu", "cuda"):
            return [f"triton runs on CUDA tensors (or CPU under TRITON_INTERPRET=1), got device {device}"]
        return []


@dataclass
class Implementation:
    backend: str
    fn: Callable
    unsupported_reasons: Callable[..., list[str]]


def _tensors_of(args):
    """The tensors among ``args``, also inside lists and tuples (grad_dot_factored takes lists)."""
    for a in args:
        if isinstance(a, torch.Tensor):
            yield a
        elif isinstance(a, (list, tuple)):
            yield from _tensors_of(a)


def _on_tensor_device(fn):
    """Run a native CUDA implementation with its first tensor argument's device current: the
    kernels launch on the current device, the tensors may live on another (cuda:1, ...)."""

    @functools.wraps(fn)
    def call(*args, **kwargs):
        device = next(_tensors_of(args)).device
        with torch.cuda.device(device):
            return fn(*args, **kwargs)

    return call


class Op:
    """One op with its implementations; call :meth:`select` then the implementation."""

    def __init__(self, name: str):
        self.name = name
        self.impls: dict[str, Implementation] = {}

    def register(self, backend: str, unsupported_reasons: Callable[..., list[str]] | None = None):
        if backend not in BACKENDS:
            raise ValueError(f"backend: expected one of {list(BACKENDS)}, got {backend!r}")

        def wrap(fn):
            call = _on_tensor_device(fn) if backend == "cuda" else fn
            self.impls[backend] = Implementation(backend, call, unsupported_reasons or (lambda *a, **k: []))
            return fn

        return wrap

    def reasons(self, backend: str, device, *args, **kwargs) -> list[str]:
        if backend not in BACKENDS:
            raise ValueError(f"backend: expected one of {list(BACKENDS)} or None, got {backend!r}")
        if backend not in self.impls:
            return [f"{self.name} has no {backend} implementation"]
        reasons = backend_unavailable_reasons(backend, device)
        return reasons or list(self.impls[backend].unsupported_reasons(*args, **kwargs))

    def cpu_or_torch(self, x: torch.Tensor) -> str:
        """"cpu" where the native implementation takes ``x`` (built module, CPU tensor, supported dtype),
        else "torch": for internal callers that pick the backend once and then call
        ``impls[name].fn`` in a loop. They name it themselves, so FIMODA_BACKEND (meant for the public
        ops) never sends an internal op to a backend it lacks."""
        return "torch" if self.reasons("cpu", x.device, x) else "cpu"

    def available(self, device) -> list[str]:
        """Backends that can run this op on ``device`` (ignoring per-input limits)."""
        return [b for b in BACKENDS if b in self.impls and not backend_unavailable_reasons(b, device)]

    def select(self, backend: str | None, device, *args, **kwargs) -> Implementation:
        device = torch.device(device)
        if device.type == "meta" or (device.type == "cuda" and not torch.cuda.is_available()):
            raise ValueError(f"device: expected a device with data that this torch can use, got {device}"
                             + (" (torch.cuda.is_available() is False)" if device.type == "cuda" else ""))
        if backend is None and os.environ.get("FIMODA_BACKEND"):
            backend = os.environ["FIMODA_BACKEND"]
            origin = "FIMODA_BACKEND"
        else:
            origin = "backend"
        if backend is not None:
            if backend not in BACKENDS:
                raise ValueError(f"{origin}: expected one of {list(BACKENDS)}, got {backend!r}")
            reasons = self.reasons(backend, device, *args, **kwargs)
            if reasons:
                raise ValueError(f"{origin}={backend!r} cannot run {self.name} on {device}: "
                                 + "; ".join(reasons))
            return self.impls[backend]
        skipped = []
        for name in PREFERENCE.get(device.type, ("torch",)):
            reasons = self.reasons(name, device, *args, **kwargs)
            if not reasons:
                if skipped:
                    warnings.warn(f"{self.name}: using the {name} backend because "
                                  + "; ".join(skipped), FallbackWarning, stacklevel=3)
                return self.impls[name]
            if name in self.impls:
                skipped.append(f"{name} cannot run: " + "; ".join(reasons))
        raise ValueError(f"no backend can run {self.name} on {device}: " + "; ".join(skipped))


OPS: dict[str, Op] = {}


def op(name: str) -> Op:
    """The registry entry for ``name`` (created on first use)."""
    return OPS.setdefault(name, Op(name))


def available_backends(op_name: str, device="cpu") -> list[str]:
    """Backends that can run ``op_name`` on ``device``, fastest first."""
    if op_name not in OPS:
        raise ValueError(f"op_name: expected one of {sorted(OPS)}, got {op_name!r}")
    device = torch.device(device)
    usable = OPS[op_name].available(device)
    order = PREFERENCE.get(device.type, ()) + tuple(b for b in BACKENDS if b not in PREFERENCE.get(device.type, ()))
    return [b for b in order if b in usable]


def cuda_stream(device: torch.device) -> int:
    """The current CUDA stream of ``device`` as an integer for the native kernels."""
    return torch.cuda.current_stream(device).cuda_stream
