"""Hessian–vector-product operators for the inverse-HVP solvers (MATH.md §1, §5).

:func:`gn_hvp` and :func:`hessian_hvp` bind a model, a task and a training set at θ* (the model's
current parameters) and return an :class:`HVPOperator` ``op``: ``op(V)`` multiplies a block of r
vectors ``V [r, p]`` (flattened in :func:`param_layout` order, i.e. ``named_parameters()``) by the
full-data matrix, ``op(V, batch=idx)`` by the matrix of the minibatch ``idx``. Both are means over
the samples involved:

- GN: M_b = (1/|b|) J_bᵀ Q_b J_b with J rows ∇_θ f_i and Q = diag(φ''_i) at θ* (MATH.md §1's G);
- true Hessian: M_b = ∇²_θ (1/|b|) Σ_{i∈b} ℓ_i at θ*.

Paths:

- ``"generic"`` (any model whose samples are independent along dim 0): GN as ``jvp`` then ``vjp``,
  the Hessian as forward-over-reverse (``jvp`` of ``grad``), each ``vmap``-ed over the r vectors
  with ``torch.func``; samples and vectors are chunked under ``max_memory``.
- ``"linear"``, GN (chosen automatically when every trainable parameter belongs to an
  ``nn.Linear`` called once on 2-D inputs, i.e. MLPs): the layer inputs a and the output gradients
  s of the scalar f are captured once at θ* (:func:`capture_linear`), then per layer
  (J V)_i = Σ_l s_{i,l}ᵀ V_l a_{i,l} and Jᵀu = Σ_i u_i s_{i,l} a_{i,l}ᵀ are two GEMMs each — no
  autograd per call. Storage: N·Σ_l(d_in + 1 + d_out) values; when that exceeds ``max_memory``
  the generic path is used.
- ``"linear"``, true Hessian (chosen automatically for an ``nn.Sequential`` of ``nn.Linear`` layers
  and elementwise activations on 2-D inputs): Pearlmutter's R-operator written out as GEMMs. One
  forward/backward of the batch is shared by the r vectors; their tangents are carried as
  ``[c, r, d]`` blocks, so every per-vector product is one GEMM over all vectors at once (about
  5 GEMMs of the layer's size per vector and layer, against a ``vmap`` of forward-over-reverse
  autograd). Activation derivatives σ′, σ″ and the loss's Hessian in the outputs come from autograd
  on the elementwise / output level only.

Both fast paths equal the generic path to rounding; ``op.path`` says which one runs and
``op.path_reason`` why.

Dtypes: the products are computed in the model's dtype; ``V`` of another float dtype is converted
and the result returned in V's dtype (float64 V with a float64 model is float64 throughout).
Call ``model.eval()`` first (attribution is done in eval mode) and do not modify the model while
using the operator: it reads the parameter values at construction for the linear path, and for the
generic path the Jacobians at every call but the GN weights φ'' at construction (a changed model
would mix both).
"""
from __future__ import annotations


import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, jvp, vjp, vmap

from ._mlp import mlp_layers
from ._validate import all_finite, check_choice, check_input, check_int, check_tensor
from .grads import _check_batch, activation_numel, capture_linear, for_sample_chunks
from .tasks import Task, output_derivatives

__all__ = ["HVPOperator", "gn_hvp", "hessian_hvp"]

# Bytes per sample, per vector and per activation value (in units of the itemsize) assumed by the
# generic path's chunking: primal + tangent activations of the jvp, the saved activations and the
# cotangents of the vjp (GN), and one more level of derivatives for forward-over-reverse (Hessian).
_ACT_COPIES = {"gn": 8, "hessian": 16}


class _LinearLayer:
    """One captured Linear layer of the fast GN path: inputs a (no ones column) and output gradients s
    over all N samples, and where its weight and bias sit in the flat vector."""

    def __init__(self, rec, a: torch.Tensor, s: torch.Tensor):
        self.name, self.d_in, self.d_out = rec.name, rec.d_in, rec.d_out
        self.w0, self.w1 = rec.weight_offset, rec.weight_offset + rec.d_in * rec.d_out
        self.b0 = rec.bias_offset
        self.a, self.s = a, s


class HVPOperator:
    """A GN or true-Hessian operator of a model on a training set at θ* (see the module docstring).

    Attributes: ``kind`` ("gn" | "hessian"), ``path`` ("linear" | "generic") and ``path_reason``,
    ``num_params`` p, ``num_samples`` N, ``dtype`` and ``device`` (the model's), ``max_memory``.
    """

    def __init__(self, model: nn.Module, task: str | Task, inputs: torch.Tensor, targets: torch.Tensor,
                 kind: str, max_memory: int = 2**30, linear: bool | None = None):
        self.kind = check_choice("kind", kind, ("gn", "hessian"))
        task, slots = _check_batch(model, task, inputs, targets, "loss")
        self.max_memory = check_int("max_memory", max_memory, min_value=1)
        if linear is not None and not isinstance(linear, bool):
            raise TypeError(f"linear: expected None, True or False, got {type(linear).__name__}")
        if inputs.shape[0] == 0:
            raise ValueError("inputs: expected at least one sample, got 0")
        named = dict(model.named_parameters())
        dtypes = {named[s.name].dtype for s in slots}
        if len(dtypes) != 1 or not next(iter(dtypes)).is_floating_point:
            raise ValueError(f"model: expected trainable parameters of one floating dtype, got {dtypes}")
        self.model, self.task, self.inputs, self.targets = model, task, inputs, targets
        self.slots = slots
        self.dtype = dtypes.pop()
        self.device = inputs.device
        self.num_params = sum(s.numel for s in slots)
        self.num_samples = inputs.shape[0]
        self._names = [s.name for s in slots]
        self._act = activation_numel(model, inputs)
        self._itemsize = torch.empty((), dtype=self.dtype).element_size()
        self._q = self._curvature() if self.kind == "gn" else None
        self._layers = None
        self._ws = {}  # per-call temporaries of the fast paths, reused (see __call__)
        self._mlp = None
        if linear is False:
            self.path, self.path_reason = "generic", "linear=False"
        else:
            why = self._capture() if self.kind == "gn" else self._mlp_structure()
            if why is not None and linear:
                raise ValueError(f"linear=True: the fast {self.kind} path for Linear layers cannot be used: {why}")
            self.path = "generic" if why else "linear"
            self.path_reason = why or (
                "every trainable parameter is in an nn.Linear with 2-D inputs (a, s captured)" if self.kind == "gn"
                else "an nn.Sequential MLP on 2-D inputs: R-operator as batched GEMMs")

    # ------------------------------------------------------------------ construction
    def _sample_chunk(self, copies: int) -> int:
        """Samples per chunk for work holding ``copies`` values per activation per sample."""
        return max(1, self.max_memory // (copies * self._act * self._itemsize))

    def _curvature(self) -> torch.Tensor:
        """φ''_i at θ* for every training sample (Q of MATH.md §1)."""
        chunk, out = self._sample_chunk(2), []
        with torch.no_grad():
            for i in range(0, self.num_samples, chunk):
                x, y = self.inputs[i:i + chunk], self.targets[i:i + chunk]
                out.append(self.task.d2loss(self.task.output(self.model(x), y), y))
        q = torch.cat(out).to(self.dtype)
        if not all_finite(q):
            raise ValueError("inputs, targets: the loss curvature φ'' is not finite at θ* for some sample")
        return q

    def _capture(self) -> str | None:
        """Capture (a, s) for the linear path; the reason it does not apply, or None."""
        a_parts, s_parts, records = {}, {}, None

        def run(start, stop):
            nonlocal records
            cap = capture_linear(self.model).run(self.task, self.inputs[start:stop], self.targets[start:stop],
                                                 wrt="output")
            if cap.uncovered:
                u = cap.uncovered[0]
                raise _NotLinear(f"parameter {u.name!r} is not covered ({u.reason})")
            for l in cap.layers:
                if l.a.dim() != 2 or l.s is None:
                    raise _NotLinear(f"layer {l.name!r} sees inputs with more than one position (T > 1)")
                if not isinstance(l.module, nn.Linear):
                    raise _NotLinear(f"layer {l.name!r} is a {type(l.module).__name__}, not an nn.Linear")
            if records is None:
                records = cap.layers
                need = self.num_samples * sum(l.d_in + 1 + l.d_out for l in records) * self._itemsize
                if need > self.max_memory:
                    raise _NotLinear(f"the captured a, s need {need} bytes > max_memory={self.max_memory}")
            for l in cap.layers:
                a_parts.setdefault(l.name, []).append(l.a[:, :l.d_in])  # the ones column is implicit
                s_parts.setdefault(l.name, []).append(l.s)
            return 4 * self._act * self._itemsize

        try:
            for_sample_chunks(self.num_samples, self.max_memory, run)
        except _NotLinear as exc:
            return str(exc)
        if not records:
            return "no nn.Linear layer found"
        self._layers = [_LinearLayer(rec, torch.cat(a_parts[rec.name]), torch.cat(s_parts[rec.name]))
                        for rec in records]
        return None

    def _mlp_structure(self) -> str | None:
        """Layers of the true-Hessian fast path; the reason it does not apply, or None."""
        layers = mlp_layers(self.model)
        if isinstance(layers, str):
            return layers
        if self.inputs.dim() != 2 or self.inputs.dtype != self.dtype:
            return (f"inputs: the MLP path takes 2-D inputs of the model's dtype {self.dtype}, got "
                    f"{tuple(self.inputs.shape)} {self.inputs.dtype}")
        offsets = {s.name: s.offset for s in self.slots}
        names = {id(p): n for n, p in self.model.named_parameters()}
        self._mlp = []
        for lin, act in layers:
            w0 = offsets[names[id(lin.weight)]]
            b0 = offsets[names[id(lin.bias)]] if lin.bias is not None else None
            self._mlp.append((lin, act, w0, b0))
        return None

    # ------------------------------------------------------------------ public
    def __repr__(self) -> str:
        return (f"HVPOperator(kind={self.kind!r}, path={self.path!r} ({self.path_reason}), "
                f"num_params={self.num_params}, num_samples={self.num_samples}, dtype={self.dtype}, "
                f"device={self.device})")

    def _batch_indices(self, batch) -> torch.Tensor | None:
        if batch is None:
            return None
        if isinstance(batch, slice):
            batch = range(*batch.indices(self.num_samples))
        if isinstance(batch, (range, list, tuple)):  # integers only (as_tensor would truncate 1.9 to 1)
            batch = torch.as_tensor([check_int(f"batch[{k}]", i) for k, i in enumerate(batch)], dtype=torch.long)
        check_tensor("batch", batch, ndim=1, dtypes=(torch.int64, torch.int32, torch.int16, torch.uint8))
        if batch.numel() == 0:
            raise ValueError("batch: expected at least one sample index, got none")
        lo, hi = int(batch.min()), int(batch.max())
        if lo < 0 or hi >= self.num_samples:
            raise ValueError(f"batch: expected indices in [0, {self.num_samples}), got values in [{lo}, {hi}]")
        return batch.to(device=self.device, dtype=torch.long)

    def __call__(self, V: torch.Tensor, batch=None, out: torch.Tensor | None = None) -> torch.Tensor:
        """``M V``: ``V [r, p]`` (or ``[p]``, returned as ``[p]``) times the full-data matrix, or the
        matrix of the minibatch ``batch`` (indices: 1-D integer tensor, list, range or slice; repeats
        count twice). Returns V's shape and dtype, written into ``out`` (contiguous, V's shape and
        dtype, not sharing V's memory) when given — a solver's loop then allocates nothing per call.
        The fast paths keep their per-call temporaries in a workspace reused from call to call (fresh
        multi-MiB tensors cost a page fault per 4 KiB on every call): it holds up to about max_memory
        plus two [r, p] blocks for the operator's lifetime, and an operator is not meant to be called
        from several threads at once."""
        check_input("V", V, ndim=(1, 2), device=self.device)  # the fast paths write into workspaces
        if not V.dtype.is_floating_point:
            raise TypeError(f"V: expected a floating dtype, got {V.dtype}")
        if V.shape[-1] != self.num_params:
            raise ValueError(f"V: expected [r, {self.num_params}] or [{self.num_params}] (p = num_params), "
                             f"got {tuple(V.shape)}")
        if out is not None:
            check_input("out", out, ndim=V.dim(), dtypes=(V.dtype,), device=self.device)
            if out.shape != V.shape or not out.is_contiguous():
                raise ValueError(f"out: expected a contiguous tensor of shape {tuple(V.shape)} (as V), got shape "
                                 f"{tuple(out.shape)}{'' if out.is_contiguous() else ' (not contiguous)'}")
            if V.numel() and out.untyped_storage().data_ptr() == V.untyped_storage().data_ptr():
                raise ValueError("out: expected memory separate from V's (V is read while out is written)")
        idx = self._batch_indices(batch)
        one = V.dim() == 1
        W = (V[None] if one else V).to(self.dtype)
        dst = None if out is None or out.dtype != self.dtype else (out[None] if one else out)
        if self.path == "linear" and W.shape[0]:
            res = self._linear_gn(W, idx, dst) if self.kind == "gn" else self._mlp_hessian(W, idx, dst)
        else:
            res = dst.zero_() if dst is not None else torch.zeros(W.shape, dtype=self.dtype, device=self.device)
            if W.shape[0]:
                self._generic(W, idx, res)
        if out is not None:
            if dst is None:
                out.copy_(res[0] if one else res)
            return out
        res = res.to(V.dtype)
        return res[0] if one else res

    def _buf(self, key, *shape: int) -> torch.Tensor:
        """A workspace tensor of this shape (contents undefined), kept across calls under ``key``."""
        n = 1
        for d in shape:
            n *= d
        t = self._ws.get(key)
        if t is None or t.numel() < n:
            t = self._ws[key] = torch.empty(n, dtype=self.dtype, device=self.device)
        return t[:n].view(shape)

    # ------------------------------------------------------------------ linear GN path
    def _linear_gn(self, V: torch.Tensor, idx: torch.Tensor | None, out: torch.Tensor | None) -> torch.Tensor:
        """G_b V from the captured (a, s), per sample chunk and per layer in one of two exact forms:

        - factored: (J V)_i += s_iᵀ V_l a_i via Z = A V_lᵀ ([c, r·d_out]) and Jᵀu via (u ∘ S)ᵀ A;
          temporaries of r·c·d_out values and a copy of V_l (about 4·r·c·d_out + 2·r·d_out·d_in moved);
        - materialized: the chunk's per-sample gradients of the layer, s_i a_iᵀ ([c, d_out·(d_in+1)],
          built once), then J V = G Vᵀ and Jᵀu = uᵀ G read V and write the output in place (about
          3·c·d_out·(d_in+1) moved) — cheaper once r is comparable to the layer's fan-in.

        Both are two GEMMs per layer with the same FLOPs; the cheaper one by the counts above is used.
        The sample chunk (and so any materialized block) is sized under max_memory; every output element
        is written by the first chunk (the layers cover all parameters), later chunks add."""
        r = V.shape[0]
        n = self.num_samples if idx is None else idx.numel()
        width = max(max(l.d_out, l.d_in) for l in self._layers)
        chunk = max(1, min(self.max_memory // (3 * r * width * self._itemsize),
                           self.max_memory // (self.num_params * self._itemsize)))
        if out is None:
            out = torch.empty(V.shape, dtype=self.dtype, device=self.device)
        Ws = {}
        for i0 in range(0, n, chunk):
            rows = slice(i0, min(n, i0 + chunk)) if idx is None else idx[i0:i0 + chunk]
            parts = [(l.a[rows], l.s[rows]) for l in self._layers]
            c = parts[0][0].shape[0]
            dense = [3 * c * (l.d_in + 1) < r * (4 * c + 2 * l.d_in) for l in self._layers]
            if all(dense):  # one [c, p] block in the flat layout: two whole-vector GEMMs, output in place
                g = self._buf("g", c, self.num_params)
                for l, (a, s) in zip(self._layers, parts):
                    torch.mul(s[:, :, None], a[:, None, :], out=g[:, l.w0:l.w1].view(c, l.d_out, l.d_in))
                    if l.b0 is not None:
                        g[:, l.b0:l.b0 + l.d_out] = s
                uT = torch.mm(g, V.T, out=self._buf("u", c, r)).mul_((self._q[rows] / n)[:, None]).T  # (Q J V/|b|)ᵀ
                torch.mm(uT, g, out=out) if i0 == 0 else out.addmm_(uT, g)
                continue
            jv, G = None, {}
            for k, (l, (a, s)) in enumerate(zip(self._layers, parts)):
                if dense[k]:
                    g = self._buf(("g", k), c, l.d_out * l.d_in)
                    torch.mul(s[:, :, None], a[:, None, :], out=g.view(c, l.d_out, l.d_in))  # s_i a_iᵀ
                    G[k] = g
                    t = g @ V[:, l.w0:l.w1].T                          # [c, r]
                else:
                    if k not in Ws:  # one copy per call
                        Ws[k] = self._buf(("V", k), r, l.d_out * l.d_in).copy_(V[:, l.w0:l.w1]).view(r * l.d_out, l.d_in)
                    z = torch.mm(a, Ws[k].T, out=self._buf(("z", k), c, r * l.d_out)).view(c, r, l.d_out)
                    # s_iᵀ V_l a_i as a broadcast product and a sum over the contiguous axis, not
                    # einsum/bmm: torch's bmm over c tiny matrices was 100× slower on a loaded 2-core machine
                    t = z.mul_(s[:, None, :]).sum(2)                   # [c, r]
                jv = t if jv is None else jv.add_(t)
                if l.b0 is not None:
                    jv.addmm_(s, V[:, l.b0:l.b0 + l.d_out].T)
            u = jv.mul_((self._q[rows] / n)[:, None])                  # Q J V / |b|, [c, r]
            uT = u.T.contiguous()
            for k, (l, (a, s)) in enumerate(zip(self._layers, parts)):
                if dense[k]:
                    g = torch.mm(uT, G[k], out=self._buf("gl", r, l.d_out * l.d_in))
                else:
                    # u_i s_i per vector as a row-major [r·d_out, c] GEMM operand, from operands
                    # contiguous along c (a transposed product would need a strided copy afterwards)
                    su = torch.mul(uT[:, None, :], s.T.contiguous()[None],
                                   out=self._buf("su", r, l.d_out, c)).view(r * l.d_out, c)
                    g = torch.mm(su, a, out=self._buf("gl", r * l.d_out, l.d_in)).view(r, l.d_out * l.d_in)
                dst = out[:, l.w0:l.w1]
                dst.copy_(g) if i0 == 0 else dst.add_(g)
                if l.b0 is not None:
                    gb, dst = uT @ s, out[:, l.b0:l.b0 + l.d_out]
                    dst.copy_(gb) if i0 == 0 else dst.add_(gb)
        return out

    # ------------------------------------------------------------------ MLP true-Hessian path
    def _mlp_hessian(self, V: torch.Tensor, idx: torch.Tensor | None, out: torch.Tensor | None) -> torch.Tensor:
        """H_b V by the R-operator (MATH.md §1, §5) for the MLP z_l = W_l h_{l-1} + b_l, h_l = σ_l(z_l).
        With R{·} the directional derivative along the vector's (V_l, c_l):

        forward   R z_l = V_l h_{l-1} + c_l + W_l R h_{l-1},   R h_l = σ'_l ⊙ R z_l   (R h_0 = 0)
        backward  R g_L = ∇²_out ℓ · R z_L;  per layer
                  (H V)_{W_l} = Σ_i R g_l h_{l-1}ᵀ + g_l (R h_{l-1})ᵀ,  (H V)_{b_l} = Σ_i R g_l,
                  R g_{l-1} = σ'_{l-1} ⊙ (W_lᵀ R g_l + V_lᵀ g_l) + σ''_{l-1} ⊙ R z_{l-1} ⊙ (W_lᵀ g_l)

        with g_l = ∂ℓ/∂z_l. Per chunk of samples the forward and backward of the data (h, σ', σ'', g) run
        once for all r vectors, their tangents as [c, r, d] blocks (sample-major), so W products are one
        [c·r, d] GEMM and V products one GEMM against the vectors' stacked weights. (Blocks of fewer
        vectors, to keep the operands in L2, measured slower: the GEMMs shrink.) Every chunk adds into
        the output; temporaries live in the workspace (``_buf``)."""
        r = V.shape[0]
        n = self.num_samples if idx is None else idx.numel()
        dims = [(lin.out_features, lin.in_features) for lin, _, _, _ in self._mlp]
        chunk = max(1, self.max_memory // (6 * r * sum(do + di for do, di in dims) * self._itemsize))
        Vw = [V[:, w0:w0 + do * di].view(r, do, di) for (_, _, w0, _), (do, di) in zip(self._mlp, dims)]
        Vc = [V[:, b0:b0 + do] if b0 is not None else None for (_, _, _, b0), (do, _) in zip(self._mlp, dims)]
        # V_lᵀ g needs the vectors' weights as [d_out, r, d_in]: one copy per call (not for layer 1)
        Vt = [None] + [self._buf(("Vt", l), do, r, di).copy_(Vw[l].transpose(0, 1))
                       for l, (do, di) in enumerate(dims) if l > 0]
        out = torch.zeros(V.shape, dtype=self.dtype, device=self.device) if out is None else out.zero_()
        with torch.no_grad():
            for i0 in range(0, n, chunk):
                rows = slice(i0, min(n, i0 + chunk)) if idx is None else idx[i0:i0 + chunk]
                x, y = self.inputs[rows], self.targets[rows]
                c = x.shape[0]
                w = torch.full((c,), 1.0 / n, dtype=self.dtype, device=self.device)
                hs, derivs, h = [x], [], x                    # the data's forward
                for lin, act, _, _ in self._mlp:
                    z = F.linear(h, lin.weight, lin.bias)
                    h, d = (z, (None, None)) if act is None else _act_derivatives(act, z)
                    hs.append(h)
                    derivs.append(d)
                self._mlp_tangents(out, c, y, w, hs, derivs, Vw, Vc, Vt, dims)
        return out

    def _mlp_tangents(self, out, c, y, w, hs, derivs, Vw, Vc, Vt, dims) -> None:
        """The data's backward and the R-forward and R-backward of all vectors over one chunk of samples
        (see above)."""
        r = out.shape[0]
        L = len(self._mlp)
        Rhs, Rzs, Rh = [None], [], None
        for l, (lin, act, _, _) in enumerate(self._mlp):
            do, di = dims[l]
            Vl, Rz = Vw[l].reshape(r * do, di).T, self._buf(("Rz", l), c, r * do)
            if Vc[l] is not None:
                torch.addmm(Vc[l].reshape(1, r * do), hs[l], Vl, out=Rz)
            else:
                torch.mm(hs[l], Vl, out=Rz)
            Rz = Rz.view(c, r, do)
            if Rh is not None:
                Rz.view(c * r, do).addmm_(Rh.view(c * r, di), lin.weight.T)
            d1, d2 = derivs[l]
            if d1 is None:
                Rh = Rz
            elif d2 is not None:  # R z is needed again in the backward
                Rh = torch.mul(Rz, d1[:, None, :], out=self._buf(("Rh", l), c, r, do))
            else:
                Rh = Rz.mul_(d1[:, None, :])
            Rzs.append(Rz if d2 is not None else None)
            Rhs.append(Rh)
        gh, Rgh = output_derivatives(self.task, hs[-1], y, w, Rh)         # along h_L
        gs, ghs = [None] * L, [None] * L                                    # the data's backward
        for l in range(L - 1, -1, -1):
            ghs[l] = gh                                                     # ∂ℓ/∂h_l
            gs[l] = gh if derivs[l][0] is None else gh * derivs[l][0]       # ∂ℓ/∂z_l
            gh = gs[l] @ self._mlp[l][0].weight if l > 0 else None
        for l in range(L - 1, -1, -1):
            lin, _, w0, b0 = self._mlp[l]
            do, di = dims[l]
            d1, d2 = derivs[l]                                              # h_l → z_l
            if d1 is None:
                Rg = Rgh
            else:
                Rg = Rgh.mul_(d1[:, None, :])
                if d2 is not None:
                    Rg.addcmul_(Rzs[l], (d2 * ghs[l])[:, None, :])
            dst, tmp = out[:, w0:w0 + do * di].view(r, do, di), self._buf("prod", r * do * di)
            dst += torch.mm(Rg.reshape(c, r * do).T, hs[l], out=tmp.view(r * do, di)).view(r, do, di)
            if Rhs[l] is not None:
                dst += torch.mm(gs[l].T, Rhs[l].reshape(c, r * di), out=tmp.view(do, r * di)).view(
                    do, r, di).transpose(0, 1)
            if b0 is not None:
                out[:, b0:b0 + do] += Rg.sum(0)
            if l > 0:                                                       # z_l → h_{l-1}
                Rgh = torch.mm(Rg.reshape(c * r, do), lin.weight,
                               out=self._buf(("Rgh", l), c * r, di)).view(c, r, di)
                Rgh.view(c, r * di).addmm_(gs[l], Vt[l].view(do, r * di))

    # ------------------------------------------------------------------ generic path
    def _functional_parts(self):
        named = dict(self.model.named_parameters())
        theta = {n: named[n].detach() for n in self._names}
        # frozen parameters and buffers pass through unchanged
        fixed = {n: t.detach() for n, t in list(named.items()) + list(self.model.named_buffers()) if n not in theta}
        return theta, fixed

    def _generic(self, V: torch.Tensor, idx: torch.Tensor | None, out: torch.Tensor) -> None:
        theta, fixed = self._functional_parts()
        model, task, kind = self.model, self.task, self.kind
        n = self.num_samples if idx is None else idx.numel()
        r_chunk = max(1, self.max_memory // (8 * self.num_params * self._itemsize))
        for v0 in range(0, V.shape[0], r_chunk):
            Vb = V[v0:v0 + r_chunk]
            rb = Vb.shape[0]
            tangents = {s.name: Vb[:, s.offset:s.offset + s.numel].reshape((rb,) + tuple(s.shape))
                        for s in self.slots}
            s_chunk = max(1, self.max_memory // (2 * rb * _ACT_COPIES[kind] * self._act * self._itemsize))
            for i0 in range(0, n, s_chunk):
                rows = slice(i0, min(n, i0 + s_chunk)) if idx is None else idx[i0:i0 + s_chunk]
                x, y = self.inputs[rows], self.targets[rows]
                if kind == "gn":
                    def f(th):
                        return task.output(functional_call(model, (th, fixed), (x,)), y)

                    jv = vmap(lambda t: jvp(f, (theta,), (t,))[1])(tangents)          # [rb, c]
                    u = jv * (self._q[rows] / n)
                    _, pullback = vjp(f, theta)
                    prod = vmap(pullback)(u)[0]
                else:
                    def loss(th):
                        return task.loss(functional_call(model, (th, fixed), (x,)), y).sum() / n

                    prod = vmap(lambda t: jvp(grad(loss), (theta,), (t,))[1])(tangents)
                for s in self.slots:
                    out[v0:v0 + rb, s.offset:s.offset + s.numel] += prod[s.name].reshape(rb, -1)


def _act_derivatives(act: nn.Module, z: torch.Tensor):
    """(σ(z), (σ'(z), σ''(z))) of an elementwise activation by autograd on the activation alone;
    σ'' is None for the piecewise-linear ones (zero almost everywhere, as autograd has it)."""
    linear_pieces = type(act) in (nn.ReLU, nn.LeakyReLU)
    with torch.enable_grad():
        zg = z.detach().requires_grad_(True)
        h = act(zg * 1)  # through a non-leaf: nn.ReLU(inplace=True) and the like write into their input
        d1, = torch.autograd.grad(h, zg, torch.ones_like(h), create_graph=not linear_pieces)
        d2 = None if linear_pieces else torch.autograd.grad(d1, zg, torch.ones_like(d1))[0]
    return h.detach(), (d1.detach(), d2)


class _NotLinear(Exception):
    """Internal: the captured-Linear GN path does not apply (the message says why)."""


def gn_hvp(model: nn.Module, task: str | Task, inputs: torch.Tensor, targets: torch.Tensor,
           max_memory: int = 2**30, linear: bool | None = None) -> HVPOperator:
    """The Gauss–Newton operator G_b = (1/|b|) J_bᵀ Q_b J_b of ``model`` on ``(inputs, targets)`` at its
    current parameters (MATH.md §1: J rows ∇_θ f_i, Q = diag(φ''_i), f and φ'' from ``task``).

    ``max_memory``: bytes for one chunk of work (and the cap on the linear path's captured a, s).
    ``linear``: None picks the captured-Linear path when it applies (``op.path``), True requires it
    (ValueError with the reason otherwise), False forces the generic ``torch.func`` path.
    """
    return HVPOperator(model, task, inputs, targets, "gn", max_memory, linear)


def hessian_hvp(model: nn.Module, task: str | Task, inputs: torch.Tensor, targets: torch.Tensor,
                max_memory: int = 2**30, linear: bool | None = None) -> HVPOperator:
    """The true Hessian H_b = ∇²_θ (1/|b|) Σ_{i∈b} ℓ_i of ``model`` on ``(inputs, targets)`` at its
    current parameters.

    ``linear``: None picks the MLP path (the R-operator as batched GEMMs) for an ``nn.Sequential`` of
    ``nn.Linear`` layers and elementwise activations, True requires it (ValueError with the reason
    otherwise), False forces the generic path: forward-over-reverse autograd (``jvp`` of ``grad``)
    batched over the vectors with ``vmap``. ``max_memory``: bytes for one chunk of work."""
    return HVPOperator(model, task, inputs, targets, "hessian", max_memory, linear)
