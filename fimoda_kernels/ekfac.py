"""EK-FAC / K-FAC influence scores of a model (MATH.md §6), built on the kernels of ops/ekfac.py.

score(z, i) = g_zᵀ (G + λI)^{-1} g_i with g = ∇_θ ℓ (loss gradients at the true labels, positive =
helpful, MATH.md §3) and G the layer-block-diagonal Kronecker-factored curvature of every
``nn.Linear`` / ``nn.Conv2d`` (via :func:`capture_linear`; sequence Linear layers and convolutions
contribute all their positions t). Parameters outside such layers are left out of the scores, as
kronfluence does; :class:`EKFAC` warns once, listing them.

Curvature (what the output gradients s of the factors are):

- ``"gn"``: gradients of the scalar model output f scaled by √φ''_i (the paper's Gauss-Newton G);
- ``"empirical"``: gradients of the loss at the true labels (kronfluence's ``use_empirical_fisher=True``);
- ``"sampled"``: gradients of the loss at labels drawn from the model's predictive distribution with a
  seeded ``torch.Generator`` (kronfluence's default, the "true Fisher"). Classification
  (:class:`CrossEntropyTask`): y ~ softmax(logits). Regression (:class:`MSETask`, ℓ = (f − y)²):
  y ~ N(f, 1/2), so that E[(∂ℓ/∂f)²] = 4·½ = 2 = φ'' and the Fisher equals the GN matrix. Each pass
  over the data restarts the generator, so both passes see the same labels when the batches come in
  the same order (a shuffling DataLoader draws different ones). Other tasks: "sampled" is rejected.

Scale convention: A and S are means over samples of sums over positions (MATH.md §6); the damping
default is MATH.md's 0.1 × mean(Λ) per layer, computed from the same Λ: kronfluence's heuristic for
``damping_factor=None``, not kronfluence's own defaults (a fixed 1e-8 and the "sampled" curvature;
``curvature="sampled", damping=1e-8`` correspond to those; the sampled labels differ).
"""
from __future__ import annotations

import math
import warnings

import torch
from torch import nn

from ._validate import check_choice, check_float, check_int, check_seed, check_tensor
from .grads import SampleError, _is_capturable, capture_linear
from .ops.ekfac import (ACC_DTYPES, default_damping, ekfac_eigen_correction, ekfac_eigenbases,
                        ekfac_precondition, ekfac_scores, kfac_eigenvalues, kfac_factors,
                        layer_gradient_matrices)
from .tasks import CrossEntropyTask, MSETask, Task, get_task

__all__ = ["EKFAC"]

_FORMAT = "fimoda_kernels.EKFAC/1"


def _layer_dims(module: nn.Module) -> tuple[int, int]:
    """(d_in including the bias column, d_out) of a Linear/Conv2d, as the capture records them."""
    return math.prod(module.weight.shape[1:]) + (module.bias is not None), module.weight.shape[0]


def _compact(a: torch.Tensor, s: torch.Tensor, dtype: torch.dtype):
    """What the fit keeps of a layer's (a, s) for the correction pass: the per-sample gradient
    matrices (in ``dtype``) where they take fewer bytes, d_out·d_in·size(dtype) < T·(d_in + d_out)·
    size(a) (conv layers: 448 against 11 264 values per sample for bench_ekfac's first one; also less
    memory to fault in), else the pair."""
    size = torch.finfo(dtype).bits / torch.finfo(a.dtype).bits  # matrix element / pair element
    if a.dim() == 3 and s.shape[2] * a.shape[2] * size < a.shape[1] * (a.shape[2] + s.shape[2]):
        return layer_gradient_matrices(a, s, dtype)
    return a, s


def _chain(first, rest):
    yield first
    yield from rest


class EKFAC:
    """EK-FAC (``strategy="ekfac"``) or K-FAC (``"kfac"``) influence of training points on test points.

    Args:
        model: the trained ``nn.Module`` (call ``model.eval()`` yourself; samples must be independent).
        task: a :class:`Task` or its name ("mse", "cross_entropy", ...).
        curvature: "gn", "empirical" or "sampled" (module doc).
        strategy: "ekfac" (eigenvalue-corrected, one extra pass over the data) or "kfac" (Λ = λ_S ⊗ λ_A).
        damping: λ ≥ 0 for every layer, or None for 0.1 × mean(Λ) per layer (kronfluence's heuristic).
        seed: the label-sampling generator's seed (``curvature="sampled"``).
        dtype: factor / eigenvalue / score dtype, torch.float32 (default) or torch.float64.
        eigh_dtype: dtype of ``torch.linalg.eigh`` (float64 default).
        backend: kernel backend ("cuda", "triton", "cpu", "torch" or None for the fastest).

    After :meth:`fit`: ``layer_names``, ``factors`` [(A, S)], ``eigenbases`` [(Q_A, λ_A, Q_S, λ_S)],
    ``eigenvalues`` [Λ ``[d_out, d_in]``] and ``damping_values`` (one λ per layer), in layer order.
    """

    def __init__(self, model: nn.Module, task, curvature: str = "gn", strategy: str = "ekfac", damping=None,
                 *, seed: int = 0, dtype: torch.dtype = torch.float32, eigh_dtype: torch.dtype = torch.float64,
                 backend: str | None = None):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
        self.model = model
        self.task = get_task(task)
        self.curvature = check_choice("curvature", curvature, ("gn", "empirical", "sampled"))
        self.strategy = check_choice("strategy", strategy, ("ekfac", "kfac"))
        if curvature == "sampled" and not isinstance(self.task, (MSETask, CrossEntropyTask)):
            raise ValueError(f"curvature: 'sampled' needs a predictive distribution, known for MSETask and "
                             f"CrossEntropyTask, got task {self.task!r}; use 'gn' or 'empirical'")
        self.damping = None if damping is None else check_float("damping", damping, min_value=0.0)
        self.seed = check_seed("seed", seed)
        for name, dt in (("dtype", dtype), ("eigh_dtype", eigh_dtype)):
            if dt not in ACC_DTYPES:
                raise ValueError(f"{name}: expected torch.float32 or torch.float64, got {dt!r}")
        self.dtype, self.eigh_dtype, self.backend = dtype, eigh_dtype, backend
        self.layer_names: list[str] | None = None
        self.factors = self.eigenbases = self.eigenvalues = self.damping_values = None
        self.num_samples = 0
        self._capture = capture_linear(model)
        self._warned = False

    # ------------------------------------------------------------------------- data plumbing

    @staticmethod
    def _batches(inputs, targets, batch_size, what: str):
        """(x, y) batches from tensors or from an iterable (DataLoader) of (inputs, targets)."""
        if isinstance(inputs, torch.Tensor):
            check_tensor(f"{what}inputs", inputs)
            check_tensor(f"{what}targets", targets)
            if targets.shape[:1] != inputs.shape[:1]:
                raise ValueError(f"{what}targets: expected {inputs.shape[0]} samples (as {what}inputs), "
                                 f"got shape {tuple(targets.shape)}")
            size = check_int("batch_size", batch_size, min_value=1)
            for start in range(0, inputs.shape[0], size):
                yield inputs[start:start + size], targets[start:start + size]
            return
        if targets is not None:
            raise ValueError(f"{what}targets: expected None when {what}inputs is a DataLoader/iterable "
                             f"of (inputs, targets), got {type(targets).__name__}")
        if not hasattr(inputs, "__iter__"):
            raise TypeError(f"{what}inputs: expected a tensor or a DataLoader of (inputs, targets), "
                            f"got {type(inputs).__name__}")
        for b, item in enumerate(inputs):
            if not isinstance(item, (list, tuple)) or len(item) != 2:
                raise ValueError(f"{what}inputs: expected batches of (inputs, targets), got "
                                 f"{type(item).__name__} at batch {b}")
            yield item[0], item[1]

    def _quantity(self, generator):
        """The per-sample quantity whose layer-output gradients are s, for the curvature."""
        task = self.task
        if self.curvature == "gn":
            def gn(out, y):
                f = task.output(out, y)
                return f * task.d2loss(f.detach(), y).clamp_min(0).sqrt()
            return gn
        if self.curvature == "empirical":
            return None
        if isinstance(task, CrossEntropyTask):
            def sampled_ce(out, y):
                probs = torch.softmax(out.detach().double(), 1)
                return task.loss(out, torch.multinomial(probs, 1, generator=generator).squeeze(1))
            return sampled_ce

        def sampled_mse(out, y):
            f = out.detach().reshape(y.shape).to(torch.float64)
            noise = torch.randn(f.shape, generator=generator, dtype=torch.float64, device=f.device)
            return task.loss(out, (f + math.sqrt(0.5) * noise).to(out.dtype))
        return sampled_mse

    def _layer_batches(self, data, curvature: bool):
        """Per batch, the captured ``[(a, s), ...]`` (curvature's s, or loss gradients at true labels)."""
        generator = None
        quantity = None
        if curvature:
            device = next(self.model.parameters()).device
            generator = torch.Generator(device=device).manual_seed(self.seed)
            quantity = self._quantity(generator)
        offset = 0
        for k, (x, y) in enumerate(data):
            try:
                cap = self._capture.run(self.task, x, y, wrt="loss", quantity=quantity)
            except SampleError as e:  # numbered in the whole set, not the batch
                raise e.shifted(offset) from None
            except ValueError as e:  # e.g. non-finite inputs: say which batch
                raise ValueError(f"batch {k}: {e}") from e
            offset += x.shape[0]
            names = [l.name for l in cap.layers]
            if not names:
                raise ValueError("model: no nn.Linear/nn.Conv2d layer could be captured "
                                 f"({[u.reason for u in cap.uncovered][:3]})")
            if self.layer_names is None:
                self.layer_names = names
            elif names != self.layer_names:
                raise ValueError(f"model: captured layers {names} differ from the fitted ones {self.layer_names}")
            if not self._warned:
                self._warned = True
                left = [f"{u.name} ({u.reason})" for u in cap.uncovered]
                if left:
                    warnings.warn("EKFAC: these parameters are outside the captured Linear/Conv2d layers and "
                                  "are left out of the curvature and the scores: " + ", ".join(left),
                                  UserWarning, stacklevel=4)
            yield [(l.a, l.s) for l in cap.layers]

    # ------------------------------------------------------------------------- fit / scores

    def fit(self, inputs, targets=None, batch_size: int = 256, cache_bytes: int = 2**30) -> "EKFAC":
        """Fit factors, eigenbases, eigenvalues and damping on the training data: ``inputs`` and
        ``targets`` tensors (batched by ``batch_size``), or a DataLoader yielding (inputs, targets)
        with ``targets=None``. "kfac" needs one pass over the data; "ekfac" a second one for the
        eigenvalue correction, which reuses the first pass's captured (a, s) when they take at most
        ``cache_bytes`` (default 1 GiB, the library-wide memory budget; 0 disables the cache: the
        data are then read, and labels sampled, again). Layers whose per-sample gradient matrices
        take fewer bytes than their (a, s) — convolutions — are kept as those matrices.
        Non-finite values raise, naming the layer and the batch. Returns ``self``."""
        cache_bytes = check_int("cache_bytes", cache_bytes, min_value=0)
        self.layer_names = None
        gen = self._layer_batches(self._batches(inputs, targets, batch_size, ""), curvature=True)
        first = next(gen, None)
        if first is None:
            raise ValueError("inputs: expected at least one batch of training data, got none")
        counted, cache = [], [] if self.strategy == "ekfac" and cache_bytes else None
        held = 0

        def stream(first, rest):
            nonlocal cache, held
            for b, layers in enumerate(_chain(first, rest)):
                counted.append(layers[0][0].shape[0])
                if cache is not None:
                    kept = [_compact(a, s, self.dtype) for a, s in layers]
                    held += sum(t.numel() * t.element_size() for e in kept
                                for t in ((e,) if isinstance(e, torch.Tensor) else e))
                    if held <= cache_bytes:
                        cache.append(kept)
                    else:
                        cache = None
                yield layers

        names = self.layer_names
        self.factors = kfac_factors(stream(first, gen), names=names, dtype=self.dtype, backend=self.backend)
        self.num_samples = sum(counted)
        self.eigenbases = ekfac_eigenbases(self.factors, names=names, eigh_dtype=self.eigh_dtype)
        if self.strategy == "kfac":
            self.eigenvalues = [kfac_eigenvalues(lam_A, lam_S) for _, lam_A, _, lam_S in self.eigenbases]
        else:
            again = cache if cache is not None else self._layer_batches(
                self._batches(inputs, targets, batch_size, ""), curvature=True)
            self.eigenvalues = ekfac_eigen_correction(again, self.eigenbases, names=names, dtype=self.dtype,
                                                      backend=self.backend)
        self.damping_values = [self.damping if self.damping is not None else default_damping(L)
                               for L in self.eigenvalues]
        return self

    def _check_fitted(self):
        if self.eigenvalues is None:
            raise RuntimeError("EKFAC: call fit(...) (or EKFAC.load) before scores(...)")

    def precondition(self, test_inputs, test_targets, batch_size: int = 256, basis: str = "rotated"):
        """Per layer ``[m, d_out, d_in]``: (G + λI)^{-1} g_z of the test points (see
        :func:`ekfac_precondition`; ``basis="original"`` for the gradient-matrix layout)."""
        self._check_fitted()
        parts = []
        for layers in self._layer_batches(self._batches(test_inputs, test_targets, batch_size, "test_"),
                                          curvature=False):
            parts.append(ekfac_precondition(layers, self.eigenbases, self.eigenvalues, self.damping_values,
                                            basis=basis, dtype=self.dtype))
        if not parts:
            raise ValueError("test_inputs: expected at least one test point, got none")
        return [torch.cat(p) for p in zip(*parts)]

    def scores(self, train_inputs, train_targets, test_inputs, test_targets, batch_size: int = 256,
               form: str = "auto") -> torch.Tensor:
        """``Tensor[n_train, n_test]``: g_zᵀ (G + λI)^{-1} g_i (loss gradients at the true labels;
        positive = the training point is helpful). Inputs: tensors or DataLoaders of (inputs,
        targets) with the matching targets argument None. Test gradients are preconditioned once
        (held as ``n_test × Σ_l d_out·d_in`` values) and rotated back to the original basis, so the
        training points, streamed in batches, are scored unrotated (``basis="original"`` of
        :func:`ekfac_scores`), in factored form or in chunks of per-sample gradients, whichever is
        faster per layer (``form``)."""
        W = self.precondition(test_inputs, test_targets, batch_size, basis="original")
        rows = [ekfac_scores(layers, self.eigenbases, W, form=form, backend=self.backend, basis="original")
                for layers in self._layer_batches(self._batches(train_inputs, train_targets, batch_size, "train_"),
                                                  curvature=False)]
        if not rows:
            raise ValueError("train_inputs: expected at least one training point, got none")
        return torch.cat(rows)

    # ------------------------------------------------------------------------- persistence

    def save(self, path) -> None:
        """Save factors, eigenbases, Λ, damping and options (``torch.save``; the model is not saved)."""
        self._check_fitted()
        layers = []
        for name, (A, S), (Q_A, lam_A, Q_S, lam_S), L, lam in zip(self.layer_names, self.factors, self.eigenbases,
                                                                  self.eigenvalues, self.damping_values):
            layers.append(dict(name=name, d_in=A.shape[0], d_out=S.shape[0], A=A.cpu(), S=S.cpu(), Q_A=Q_A.cpu(),
                               lam_A=lam_A.cpu(), Q_S=Q_S.cpu(), lam_S=lam_S.cpu(), Lambda=L.cpu(), damping=lam))
        options = dict(curvature=self.curvature, strategy=self.strategy, damping=self.damping, seed=self.seed,
                       dtype=str(self.dtype).removeprefix("torch."),
                       eigh_dtype=str(self.eigh_dtype).removeprefix("torch."))
        torch.save(dict(format=_FORMAT, options=options, num_samples=self.num_samples, layers=layers), path)

    @classmethod
    def load(cls, path, model: nn.Module, task, backend: str | None = None) -> "EKFAC":
        """An :class:`EKFAC` restored from :meth:`save` for ``model`` (whose Linear/Conv2d layers must
        have the saved names and shapes) and ``task``; tensors go to the model's device."""
        state = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(state, dict) or state.get("format") != _FORMAT:
            raise ValueError(f"path: expected a file written by EKFAC.save ({_FORMAT}), got {path!r}")
        opts = dict(state["options"])
        for key in ("dtype", "eigh_dtype"):
            opts[key] = getattr(torch, opts[key])
        self = cls(model, task, backend=backend, **opts)
        device = next(model.parameters()).device
        modules = dict(model.named_modules())
        for rec in state["layers"]:
            m = modules.get(rec["name"])
            if m is None or not _is_capturable(m):
                raise ValueError(f"model: expected a Linear/Conv2d layer {rec['name']!r} as in {path!r}, "
                                 f"got {type(m).__name__ if m is not None else 'none'}")
            if _layer_dims(m) != (rec["d_in"], rec["d_out"]):
                raise ValueError(f"model: layer {rec['name']!r} has (d_in incl. bias, d_out) = {_layer_dims(m)}, "
                                 f"the saved factors {(rec['d_in'], rec['d_out'])}")
        to = lambda t: t.to(device)  # noqa: E731
        L = state["layers"]
        self.layer_names = [r["name"] for r in L]
        self.factors = [(to(r["A"]), to(r["S"])) for r in L]
        self.eigenbases = [(to(r["Q_A"]), to(r["lam_A"]), to(r["Q_S"]), to(r["lam_S"])) for r in L]
        self.eigenvalues = [to(r["Lambda"]) for r in L]
        self.damping_values = [float(r["damping"]) for r in L]
        self.num_samples = int(state["num_samples"])
        return self
