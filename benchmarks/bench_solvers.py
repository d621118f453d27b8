"""Benchmark the inverse-HVP solvers (MATH.md §5) on the paper's Energy-sized problem.

Model: MLP 8→128→128→1 (ReLU, float32, p = 17,793), MSE, N = 691 training points of random
standardized data of that shape, r = 77 test vectors (the test points' loss gradients), damping
λ = 100·λ₀ with λ₀ the mean squared training-gradient entry (the paper's choice), minibatches of 128
(the paper's training batch size), depth 5000.

Cases:

- ``lissa`` (GN) and ``lissa_h`` (true Hessian): ``fimoda_kernels.lissa`` on all 77 vectors at once
  vs 'reference' — torch-influence's ``LiSSAInfluenceModule`` algorithm written out below: one vector
  at a time, per depth step one minibatch (``RandomSampler(replacement=True)``) and one HVP through
  ``torch.autograd.functional`` double-backward (GN: jvp → hvp of the loss in the outputs → vjp; true H:
  hvp of the loss), then ``h = v + h − (Hh + λh)/s``. The reference is timed on a subset of vectors and
  depth and extrapolated linearly to 77 × 5000 (its cost is exactly linear in both: one HVP of a fixed
  batch size per vector and step); the record says what was run (``extra.ran``). ``lissa_h`` (ours) is
  likewise run at a reduced depth and extrapolated (``extra.ran``), on the MLP path (the R-operator as
  batched GEMMs, 'fimoda') and on the generic torch.func path ('fimoda_generic', forward-over-reverse).
- ``cg``: ``fimoda_kernels.cg`` (77 independent recursions batched) vs 'reference' — scipy's
  ``scipy.sparse.linalg.cg`` on a ``LinearOperator`` per vector, whose matvec is the same full-data GN
  operator plus λ, same tol (rtol) and damping.
- ``lissa_update``: the fused update on [77, 17793] per backend vs the float64 torch reference and
  ('torch_unfused') the same float32 step written as plain torch expressions.

    python benchmarks/bench_solvers.py [--quick] [--device cpu|cuda] [--out DIR]
"""
import sys

import numpy as np
import torch
from torch import nn

from harness import finish, parse_args, record, run_case, time_fn

WIDTHS = (8, 128, 128, 1)
FULL = dict(n=691, r=77, depth=5000, batch=128, ref_vectors=2, ref_depth=100, h_depth=200, h_ref_depth=50)
QUICK = dict(n=691, r=8, depth=50, batch=128, ref_vectors=1, ref_depth=20, h_depth=10, h_ref_depth=5)


def energy_problem(device, r, n):
    import fimoda_kernels as fk

    torch.manual_seed(0)
    layers = []
    for a, b in zip(WIDTHS, WIDTHS[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    model = nn.Sequential(*layers[:-1]).to(device).eval()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n + r, WIDTHS[0], generator=g).to(device)  # standardized features
    y = torch.randn(n + r, generator=g).to(device)             # standardized targets
    g_tr = fk.per_sample_grads(model, "mse", x[:n], y[:n])
    lam = 100 * float((g_tr ** 2).mean())                      # 100·λ₀ (MATH.md §3)
    v = fk.per_sample_grads(model, "mse", x[n:], y[n:])        # test-loss gradients [r, p]
    return model, x[:n], y[:n], v, lam


# ----------------------------------------------------------------------------- reference (torch-influence)

class TorchInfluenceLiSSA:
    """torch-influence's LiSSAInfluenceModule.inverse_hvp, one vector at a time (its algorithm, written
    out for this benchmark; no regularization term)."""

    def __init__(self, model, x, y, damp, scale, depth, batch_size, gnh, seed=0):
        self.model, self.x, self.y = model, x, y
        self.damp, self.scale, self.depth, self.batch_size, self.gnh = damp, scale, depth, batch_size, gnh
        self.names = [n for n, _ in model.named_parameters()]
        self.shapes = [p.shape for p in model.parameters()]
        self.flat = torch.cat([p.detach().flatten() for p in model.parameters()])
        self.gen = torch.Generator().manual_seed(seed)

    def _params(self, theta):
        out, i = {}, 0
        for name, shape in zip(self.names, self.shapes):
            out[name] = theta[i:i + shape.numel()].view(shape)
            i += shape.numel()
        return out

    def _hvp_at_batch(self, xb, yb, vec):
        F = torch.autograd.functional

        def out_f(theta):
            return torch.func.functional_call(self.model, self._params(theta), (xb,)).squeeze(1)

        def loss_f(out):
            return ((out - yb) ** 2).mean()

        if self.gnh:
            out, jvp = F.jvp(out_f, self.flat, v=vec)
            hjvp = F.hvp(loss_f, out, v=jvp)[1]
            return F.vjp(out_f, self.flat, v=hjvp)[1]
        return F.hvp(lambda t: loss_f(out_f(t)), self.flat, v=vec)[1]

    def inverse_hvp(self, vec):
        h = vec.clone()
        n = self.x.shape[0]
        for _ in range(self.depth):
            idx = torch.randint(n, (self.batch_size,), generator=self.gen)  # RandomSampler(replacement=True)
            hvp = self._hvp_at_batch(self.x[idx], self.y[idx], h)
            with torch.no_grad():
                hvp = hvp + self.damp * h
                h = vec + h - hvp / self.scale
        return h / self.scale


def scipy_cg(op, v, lam, tol, max_iter):
    import scipy.sparse.linalg as L

    p = v.shape[1]

    def matvec(z):
        t = torch.from_numpy(np.asarray(z, dtype=np.float32).reshape(1, p))
        return (op(t) + lam * t).numpy().reshape(-1)

    A = L.LinearOperator((p, p), matvec=matvec, dtype=np.float32)
    out, iters = [], []
    for row in v:
        count = [0]
        x, info = L.cg(A, row.numpy(), rtol=tol, maxiter=max_iter, callback=lambda _: count.__setitem__(0, count[0] + 1))
        out.append(x)
        iters.append(count[0])
    return np.stack(out), iters


# ----------------------------------------------------------------------------- main

def _record_extrapolated(args, op, shape, stats, factor, ran, extra=None):
    scaled = {k: (v * factor if k in ("median_s", "min_s", "iqr_s", "mean_s") and v is not None else v)
              for k, v in stats.items()}
    return record(op, "reference", shape, torch.float32, args.device, scaled, peaks=args.peaks,
                  extra=dict(extrapolated=True, factor=factor, ran=ran, **(extra or {})), out_dir=args.out,
                  mode=args.mode)


def main(argv=None) -> int:
    args = parse_args(__doc__, argv)
    import fimoda_kernels as fk

    cfg = QUICK if args.quick else FULL
    device = torch.device(args.device)
    model, x, y, v, lam = energy_problem(device, cfg["r"], cfg["n"])
    r, p = v.shape
    gn = fk.gn_hvp(model, "mse", x, y)
    hs = fk.hessian_hvp(model, "mse", x, y)
    hs_generic = fk.hessian_hvp(model, "mse", x, y, linear=False)
    print(f"# {gn}\n# λ = {lam:.3g}, r = {r}, p = {p}", flush=True)

    # the scale: the paper's rule (smallest non-diverging rung) at a short depth, then fixed for timing
    scales = {}
    for kind, op in (("lissa", gn), ("lissa_h", hs)):
        _, info = fk.lissa(op, v[:4], depth=min(cfg["depth"], 200), scale="auto", damping=lam, absolute_damping=True,
                           batch_size=cfg["batch"], return_info=True)
        scales[kind] = info["scale"]
        print(f"# {kind}: scale='auto' picked {info['scale']:g} (rejected {info['tried']})", flush=True)

    want = dict(ref=args.impl is None or "reference" in args.impl)
    timing = dict(args.timing, device=args.device)
    for kind, op, depth, ref_depth, gnh in (("lissa", gn, cfg["depth"], cfg["ref_depth"], True),
                                            ("lissa_h", hs, cfg["h_depth"], cfg["h_ref_depth"], False)):
        s = scales[kind]
        full_depth = cfg["depth"]
        shape = dict(model="8-128-128-1", n=cfg["n"], r=r, p=p, depth=full_depth, batch=cfg["batch"])
        # one LiSSA step costs the same at every depth: time `depth` steps, scale to full_depth
        factor_ours = full_depth / depth
        if want["ref"]:
            k = cfg["ref_vectors"]
            ref = TorchInfluenceLiSSA(model, x, y, lam, s, ref_depth, cfg["batch"], gnh)
            stats = time_fn(lambda: [ref.inverse_hvp(v[i]) for i in range(k)], **dict(timing, min_repeat=1))
            _record_extrapolated(args, kind, shape, stats, (r / k) * (full_depth / ref_depth),
                                 ran=f"{k} vectors x depth {ref_depth}")
        for impl, o in [("fimoda", op)] + ([("fimoda_generic", hs_generic)] if kind == "lissa_h" else []):
            fn = lambda o=o: fk.lissa(o, v, depth=depth, scale=s, damping=lam, absolute_damping=True,  # noqa: E731
                                      batch_size=cfg["batch"])
            if factor_ours == 1:
                run_case(args, kind, impl, fn, shape=shape, dtype=torch.float32, extra=dict(scale=s, path=o.path))
            elif args.impl is None or impl in args.impl:
                stats = time_fn(fn, **dict(timing, min_repeat=1))
                scaled = {kk: (vv * factor_ours if kk in ("median_s", "min_s", "iqr_s", "mean_s") and vv is not None
                               else vv) for kk, vv in stats.items()}
                record(kind, impl, shape, torch.float32, args.device, scaled, peaks=args.peaks,
                       extra=dict(extrapolated=True, factor=factor_ours, ran=f"{r} vectors x depth {depth}", scale=s,
                                  path=o.path), out_dir=args.out, mode=args.mode)

    # CG: ours batched vs scipy per vector, same operator, damping and tol
    tol, max_iter = 1e-5, 1000
    shape = dict(model="8-128-128-1", n=cfg["n"], r=r, p=p, tol=tol)
    sol = {}
    if want["ref"]:
        run_case(args, "cg", "reference", lambda: sol.__setitem__("ref", scipy_cg(gn, v, lam, tol, max_iter)),
                 shape=shape, dtype=torch.float32)
    run_case(args, "cg", "fimoda", lambda: sol.__setitem__("ours", fk.cg(gn, v, lam, tol=tol, max_iter=max_iter)),
             shape=shape, dtype=torch.float32)
    if "ref" in sol and "ours" in sol:
        x_ref, it_ref = sol["ref"]
        x_ours, info = sol["ours"]
        diff = float(np.linalg.norm(x_ours.numpy() - x_ref) / np.linalg.norm(x_ref))
        print(f"# cg iterations: scipy mean {np.mean(it_ref):.1f}, ours mean {info['iterations'].float().mean():.1f} "
              f"(max {int(info['iterations'].max())}); ‖x_ours − x_scipy‖/‖x_scipy‖ = {diff:.2e}", flush=True)

    # the fused update itself
    gen = torch.Generator().manual_seed(2)
    h, vv, mh = (torch.randn(r, p, generator=gen).to(device) for _ in range(3))
    nbytes = 4 * 4 * r * p  # three reads, one write
    def unfused():  # the same step in plain float32 torch: five passes over [r, p] and two temporaries
        new = vv + (1 - 0.01) * h - mh / 50.0
        return h.copy_(new), (new * new).sum(1)

    run_case(args, "lissa_update", "torch_unfused", unfused, shape=dict(r=r, p=p), dtype=torch.float32,
             bytes=nbytes)
    for b in ["torch"] + [b for b in fk.available_backends("lissa_update", args.device) if b != "torch"]:
        run_case(args, "lissa_update", "reference" if b == "torch" else b,
                 lambda b=b: fk.lissa_update(h, vv, mh, 50.0, 0.01, out=h, backend=b),
                 shape=dict(r=r, p=p), dtype=torch.float32, bytes=nbytes)
    return finish()


if __name__ == "__main__":
    sys.exit(main())
