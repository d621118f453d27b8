"""Benchmark the attribution methods (``fimoda_kernels.attribute``, MATH.md §3, §7, §8) and dattri's
DataInf / CG / LiSSA on the same problems.

Cases (MSE regression, ReLU MLP; inputs standard normal from a seeded generator, targets a fixed
random smooth function of them plus noise, both standardized; the model initialized with a fixed
seed and trained briefly by seeded SGD so it is a plausible final model, not a stationary point):

    energy   8→128→128→1 (p = 17 793), 691 train / 77 test (the Energy data set's sizes)
    mlp10k   8→128→128→1, 10 000 train / 100 test
    quick    8→32→32→1, 150 train / 10 test, LiSSA depth 10 (--quick: the CI smoke run, < 1 min)

Impl ``fimoda``: every method of ``fimoda_kernels.METHODS`` with ``attribute``'s defaults (the paper
code's), except LiSSA / LiSSA-H where a depth-5000 call is predicted slower than --max-call-s: then
the case is timed at the largest depth that fits (printed, ``extra.depth``; sized from short probe
runs) and the time at depth 5000 is extrapolated linearly (``extra.extrapolated_s``: the per-step
time from that run and a depth-1 call, or from the probes when the run is too short to measure it).
``ekfac`` is skipped, with the reason printed, while ``fimoda_kernels.EKFAC`` is missing.

Impl ``dattri`` (dattri 0.3.0, ``IFAttributor*`` on an ``AttributionTask`` whose loss is the batch mean
of (f − y)², i.e. our per-sample ℓ averaged; one DataLoader batch for the whole training set and one
for the test set, so dattri's full-data curvature is one batch and its CG / LiSSA solve runs once):

- DataInf: dattri takes one ``regularization`` for every layer (layers = parameter-name prefixes,
  weight + bias together, as ours), so the per-layer λ_l of our default cannot be passed. It runs
  with λ = λ₀/10 (λ₀ = mean squared gradient entry: the tabular rule λ_l = mean_j mean(g_{l,j}²)/10
  applied to the whole model as one layer) and is compared with ours at ``damping=λ₀/10`` (impl
  ``fimoda_scalar``, the same formula: time ratio and cosine) and with our default per-layer λ_l.
- CG: ours solves (G + λI)x = g_z with the Gauss–Newton G, λ = 100·λ₀, to a relative residual 1e-6;
  dattri's ``IFAttributorCG`` solves (H + λI)x = g_z with the true Hessian H of the mean loss,
  ``regularization`` = the same λ, starting from x₀ = g_z and running exactly ``max_iter`` iterations
  (no tolerance test): it gets our largest per-test-point CG iteration count. Impl ``dattri_gn``
  (--dattri-gn; on in --quick) gives dattri the loss of the linearized model
  φ(f(θ*) + J(θ − θ*)), whose gradient at θ* is ours and whose Hessian is exactly G: the same
  equations as ours, so its cosine isolates the solver from the curvature choice.
- LiSSA: dattri's ``IFAttributorLiSSA`` runs the recursion h ← g + (1 − d)h − H_b h / s, result h/s,
  MATH.md §5's (effective damping d·s) but with the true Hessian: it is compared with our ``lissa_h``
  (same curvature), whose damping is torch-influence's absolute λ = 100·λ₀, with d = λ/s and s = the
  scale our run resolved,
  batch 128, the same depth (capped as above; then ours is re-run at dattri's depth for the cosine and
  both times are extrapolated to depth 5000). dattri draws its minibatches without replacement from
  torch's global generator (seeded here) and independently per test point; ours share one seeded
  draw per step for all test points.

Reported for dattri: the time ratio dattri / fimoda and the mean over test points of the cosine
between the two score columns (both positive = helpful: a mean cosine near −1 would mean dattri
returns the negation; it is printed as measured, never sign-flipped). A call predicted slower than
--max-call-s (default 300 s, quick 10 s) is not run and the SKIP line says so: dattri CG from 1- and
k-iteration runs, LiSSA depths from depth-1 and depth-k runs (:func:`linear_probe`) (then capped, see above), everything
else from the same impl's previous case scaled by n_train·n_test.
Peak memory per case: ``harness.peak_memory`` (CPU: process RSS). Calls slower than the harness's
per-case sample budget are timed once (cold, ``extra.timing = "one call"``).

    python benchmarks/bench_methods.py [--quick] [--device cpu|cuda] [--cases energy,mlp10k]
        [--max-call-s S] [--lissa-scale auto|S] [--dattri-gn] [--no-dattri] [--out DIR]
"""
from __future__ import annotations

import math
import sys
import time

import torch
from torch import nn

import harness
from harness import finish, fmt_bytes, fmt_time, parse_args, peak_memory, record

# name -> (widths, n_train, n_test, SGD epochs)
CASES = {"full": {"energy": ((8, 128, 128, 1), 691, 77, 20), "mlp10k": ((8, 128, 128, 1), 10_000, 100, 20)},
         "quick": {"quick": ((8, 32, 32, 1), 150, 10, 100)}}
PAPER_DEPTH = {"full": 5000, "quick": 10}  # LiSSA depth: the paper code's 5000; the smoke run's 10
MAX_CALL_S = {"full": 300.0, "quick": 10.0}  # this script's --max-call-s defaults
TRAIN = dict(lr=0.01, batch=32)
LISSA = ("lissa", "lissa_h")
OP = "attribute"

MAPPINGS = {
    "datainf": "dattri IFAttributorDataInf(regularization=λ₀/10) — one λ for all layers (dattri has no "
               "per-layer λ); vs fimoda datainf(damping=λ₀/10) [same formula] and fimoda default per-layer λ_l",
    "cg": "dattri IFAttributorCG(regularization=λ, max_iter=our max CG iterations), λ = our 100·λ₀; dattri: "
          "true Hessian, x₀ = g_z, fixed iteration count; ours: Gauss–Newton, tol 1e-6",
    "lissa_h": "dattri IFAttributorLiSSA(damping=d, scaling=s, batch_size=128, recursion_depth=same), "
               "d = λ/s with λ = our 100·λ₀ and s = our resolved scale; both true Hessian, effective damping λ",
}


def mlp(widths):
    layers = []
    for a, b in zip(widths, widths[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


def make_problem(widths, n, m, epochs, device, seed=0):
    """Seeded standardized data and an MLP trained briefly by seeded SGD (eval mode)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n + m, widths[0], generator=gen)
    w = torch.randn(widths[0], 4, generator=gen) / math.sqrt(widths[0])
    y = torch.tanh(2 * x @ w).sum(1) + 0.3 * torch.randn(n + m, generator=gen)
    x = (x - x[:n].mean(0)) / x[:n].std(0)
    y = (y - y[:n].mean()) / y[:n].std()
    torch.manual_seed(seed)
    model = mlp(widths)
    opt = torch.optim.SGD(model.parameters(), lr=TRAIN["lr"])
    for _ in range(epochs):
        perm = torch.randperm(n, generator=gen)
        for i in range(0, n, TRAIN["batch"]):
            b = perm[i:i + TRAIN["batch"]]
            loss = ((model(x[b]).squeeze(-1) - y[b]) ** 2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    model = model.eval().to(device)
    x, y = x.to(device), y.to(device)
    with torch.no_grad():
        mse = [float(((model(x[s]).squeeze(-1) - y[s]) ** 2).mean()) for s in (slice(0, n), slice(n, None))]
    return model, (x[:n], y[:n]), (x[n:], y[n:]), mse


def mean_cos(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean over test points (columns) of the cosine between two [n_train, n_test] score matrices."""
    return float(torch.nn.functional.cosine_similarity(a.double().cpu(), b.double().cpu(), dim=0).mean())


# ----------------------------------------------------------------------------- measuring

_S_PER_NM: dict = {}  # (method, impl) -> seconds per n_train·n_test of its last case


def _single_call(fn):
    """(output, seconds, peak bytes) of one call, memory sampled during it."""
    box = []
    t = time.perf_counter()
    mem = peak_memory(lambda: box.append(fn()) or box[-1])
    return box[0], time.perf_counter() - t, mem


def measure(args, method, impl, fn, shape, extra=None, post=None, predict=True):
    """Run ``fn`` once (its output is returned, e.g. for the cosine); if that call fits the sample
    budget, time it with :func:`harness.time_fn` (cold call excluded, peak memory), otherwise keep the
    one call's time and memory. Then one :func:`harness.record` (a printed line and a JSON line) whose
    ``extra`` includes ``post(output, median_s) -> dict`` (cosines, ratios, extrapolations). Skips
    when the previous case predicts a call slower than --max-call-s (``predict``; off where a probe
    already sized the call). Returns (output, record)."""
    if args.impl and impl not in args.impl:
        return None, None
    label = f"{OP} {args.device} {method} {impl} {harness.fmt_shape(shape)}"
    key, nm = (method, impl), shape["n_train"] * shape["n_test"]
    if predict and key in _S_PER_NM and _S_PER_NM[key] * nm > args.max_call_s:
        print(f"SKIP {label}: predicted {fmt_time(_S_PER_NM[key] * nm)} per call (from the previous case, "
              f"scaled by n_train·n_test) > --max-call-s {args.max_call_s:g}", flush=True)
        return None, None
    extra = dict(extra or {}, method=method)
    try:
        out, secs, mem = _single_call(fn)
        if secs <= args.timing["max_time"]:
            stats = harness.time_fn(fn, device=args.device, memory=True, **args.timing)
        else:
            stats = dict(median_s=secs, min_s=secs, iqr_s=None, n=1, cold_s=secs, peak_mem_bytes=mem)
            extra["timing"] = "one call"
        if post is not None:
            extra.update(post(out, stats["median_s"]))
    except Exception as e:  # noqa: BLE001 - reported and counted (exit status), the other cases go on
        print(f"FAIL {label}: {type(e).__name__}: {e}", flush=True)
        harness._FAILED.append(label)
        return None, None
    _S_PER_NM[key] = secs / nm
    rec = record(OP, impl, shape, torch.float32, args.device, stats, peaks=args.peaks, extra=extra,
                 out_dir=args.out, mode=args.mode)
    return out, rec


def linear_probe(label, make_fn, most=None):
    """(seconds of ``make_fn(1)()``, seconds per extra step) from a 1-step call and a k-step call,
    k = 4, 16, 64, ... (at most ``most``) until the k steps add a measurable time (0.5 s and half the
    1-step time: the fixed part is noisy on a loaded machine); None (reported) if a call raises."""
    try:
        t1 = _single_call(make_fn(1))[1]
        k = 4
        while True:
            tk = _single_call(make_fn(k))[1]
            if tk - t1 >= 0.5 + 0.5 * t1 or (most is not None and 4 * k > most):
                break
            k *= 4
    except Exception as e:  # noqa: BLE001 - reported and counted, the other cases go on
        print(f"FAIL {label}: {type(e).__name__}: {e}", flush=True)
        harness._FAILED.append(label)
        return None
    return t1, max((tk - t1) / (k - 1), 1e-9), k


def probe_depth(args, label, make_fn, target):
    """Probe depths (:func:`linear_probe`); return (depth to run, depth-1 seconds): the target depth if
    predicted within --max-call-s, else the largest depth that is (at least 4); None on failure."""
    probe = linear_probe(label, make_fn, most=target)
    if probe is None:
        return None
    t1, per_step, k = probe
    predicted = t1 + per_step * (target - 1)
    if predicted <= args.max_call_s:
        return target, (t1, per_step, k)
    depth = max(4, min(target, 1 + int((args.max_call_s - t1) / per_step)))
    print(f"NOTE {label}: depth {target} predicted {fmt_time(predicted)} > --max-call-s {args.max_call_s:g}; "
          f"timed at depth {depth}, the depth-{target} time extrapolated linearly", flush=True)
    return depth, (t1, per_step, k)


def extrapolate(t_depth, depth, target, probe):
    """Time at depth ``target`` from the time at ``depth``, linearly: the per-step time from this run
    and the depth-1 probe when the run is longer than the probe's k steps, else the probe's (a few
    steps' difference drowns in the noise of a loaded machine)."""
    if depth >= target:
        return t_depth
    t1, per_step, k = probe
    if depth > k and t_depth > t1:
        per_step = (t_depth - t1) / (depth - 1)
    return t_depth + per_step * (target - depth)


# ----------------------------------------------------------------------------- dattri

def dattri_setup(model, train, test, gn=False):
    """An AttributionTask on our MSE loss (batch mean of (f − y)²) and single-batch loaders.
    ``gn``: the loss of the model linearized at θ* (same gradient at θ*, Hessian = Gauss–Newton)."""
    from torch.utils.data import DataLoader, TensorDataset

    import dattri.algorithm.base as dattri_base
    from dattri.task import AttributionTask

    dattri_base.tqdm = lambda it, **_: it  # no progress bars in benchmark output
    theta0 = {k: v.detach().clone() for k, v in model.named_parameters()}

    def forward(params, x):
        if not gn:
            return torch.func.functional_call(model, params, x)
        delta = {k: params[k] - theta0[k] for k in theta0}
        f0, jv = torch.func.jvp(lambda p: torch.func.functional_call(model, p, x), (theta0,), (delta,))
        return f0 + jv

    def loss_func(params, data):
        x, t = data
        return ((forward(params, x).squeeze(-1) - t) ** 2).mean()

    task = AttributionTask(loss_func=loss_func, model=model, checkpoints=model.state_dict())
    tr = DataLoader(TensorDataset(*train), batch_size=train[0].shape[0], shuffle=False)
    te = DataLoader(TensorDataset(*test), batch_size=test[0].shape[0], shuffle=False)
    return task, tr, te


def dattri_fn(kind, model, train, test, device, gn=False, **kw):
    from dattri.algorithm.influence_function import IFAttributorCG, IFAttributorDataInf, IFAttributorLiSSA

    cls = {"datainf": IFAttributorDataInf, "cg": IFAttributorCG, "lissa": IFAttributorLiSSA}[kind]

    def run():
        task, tr, te = dattri_setup(model, train, test, gn)
        att = cls(task, device=str(device), **kw)
        att.cache(tr)
        return att.attribute(tr, te).detach()
    return run


def have_dattri() -> str | None:
    try:
        import dattri  # noqa: F401
        from dattri.algorithm.influence_function import IFAttributorCG  # noqa: F401
    except ImportError as e:
        return f"dattri is not installed ({e}); `pip install dattri==0.3.0` for the comparison"
    return None


# ----------------------------------------------------------------------------- main

def add_arguments(p):
    p.set_defaults(max_call_s=None)
    p.add_argument("--cases", default=None, help="comma-separated case names (default: all of the mode)")
    p.add_argument("--lissa-scale", default="auto", help="LiSSA scale s (default 'auto', attribute's default)")
    p.add_argument("--dattri-gn", action="store_true",
                   help="also run dattri CG on the linearized (Gauss–Newton) loss (always on with --quick)")
    p.add_argument("--no-dattri", action="store_true", help="skip the dattri comparison")


def main(argv=None) -> int:
    args = parse_args(__doc__, argv, add_arguments)
    args.max_call_s = args.max_call_s if "--max-call-s" in (argv or sys.argv) else MAX_CALL_S[args.mode]
    import fimoda_kernels as fk
    from fimoda_kernels.methods._common import base_damping

    device = torch.device(args.device)
    target_depth = PAPER_DEPTH[args.mode]
    scale = args.lissa_scale if args.lissa_scale == "auto" else float(args.lissa_scale)
    try:
        from fimoda_kernels import EKFAC  # noqa: F401
        ekfac_missing = None
    except (ImportError, AttributeError) as e:
        ekfac_missing = f"fimoda_kernels.EKFAC is not available ({type(e).__name__}: {e})"
    dattri_missing = "--no-dattri" if args.no_dattri else have_dattri()
    dattri_gn = args.dattri_gn or args.quick
    cases = CASES[args.mode]
    names = args.cases.split(",") if args.cases else list(cases)
    unknown = sorted(set(names) - set(cases))
    if unknown:
        print(f"--cases: unknown {unknown} for mode {args.mode}; expected some of {sorted(cases)}", file=sys.stderr)
        return 2
    print(f"LiSSA: depth {target_depth} (paper 5000), scale {scale}; --max-call-s {args.max_call_s:g}", flush=True)
    summary = []

    for name in names:
        widths, n, m, epochs = cases[name]
        model, train, test, mse = make_problem(widths, n, m, epochs, device)
        p = sum(q.numel() for q in model.parameters())
        task = fk.get_task("mse")
        lam0 = base_damping(model, task, train)
        shape = lambda method: dict(case=name, method=method, n_train=n, n_test=m, p=p)  # noqa: E731
        print(f"case {name}: MLP {'→'.join(map(str, widths))}, p={p}, n_train={n}, n_test={m}, "
              f"trained MSE train {mse[0]:.3f} / test {mse[1]:.3f}, λ₀={lam0:.4g}", flush=True)
        ours, info, recs = {}, {}, {}

        def attr(method, **kw):
            return lambda: fk.attribute(method, model, task, train, test, **kw)

        def attr_scores(method, **kw):  # Scores: the output plus what the method resolved (damping, scale)
            return lambda: fk.attribute_scores(method, model, task, train, test, **kw)

        for method in fk.METHODS:
            if method == "ekfac" and ekfac_missing:
                print(f"SKIP {OP} {method} {name}: {ekfac_missing}", flush=True)
                continue
            kw, extra = {}, {}
            if method in LISSA:
                kw = dict(scale=scale)
                label = f"{OP} {args.device} {method} fimoda {name} (depth probe)"
                probe = probe_depth(args, label, lambda d, method=method: attr(method, depth=d, **kw), target_depth)
                if probe is None:
                    continue
                depth, probe = probe
                kw["depth"] = depth
                extra = dict(depth=depth, target_depth=target_depth)
            post = None
            if method in LISSA:
                post = lambda out, t, probe=probe, depth=depth: dict(  # noqa: E731
                    extrapolated_s=extrapolate(t, depth, target_depth, probe), scale=float(out.info["lissa"]["scale"]))
            out, rec = measure(args, method, "fimoda", attr_scores(method, **kw), shape(method), extra=extra, post=post,
                               predict=method not in LISSA)
            if out is None:
                continue
            ours[method], info[method], recs[method] = out.scores, out.info, rec
            if method in LISSA:
                if depth < target_depth:
                    print(f"  {method}: depth {depth}: {fmt_time(rec['median_s'])}; extrapolated to depth "
                          f"{target_depth}: {fmt_time(rec['extra']['extrapolated_s'])}", flush=True)

        if dattri_missing:
            print(f"SKIP dattri comparison: {dattri_missing}", flush=True)
            continue

        def compare(method, impl, fn, ours_scores, ours_rec, mapping, extra=None, predict=True):
            print(f"  dattri {method}: {mapping}", flush=True)
            if ours_scores is None:
                print(f"SKIP dattri {method} {name}: no fimoda result to compare with", flush=True)
                return
            t_ours = ours_rec["median_s"]
            post = lambda out, t: dict(cos_vs_fimoda=mean_cos(out, ours_scores), mapping=mapping,  # noqa: E731
                                       time_ratio_vs_fimoda=t / t_ours)
            out, rec = measure(args, method, impl, fn, shape(method), extra=extra, post=post, predict=predict)
            if out is None:
                summary.append((name, method, impl, t_ours, None, None, None, "skipped / failed"))
                return
            t_dattri = rec["median_s"]
            cos = rec["extra"]["cos_vs_fimoda"]
            note = "dattri returns the negation" if cos < -0.5 else ""
            print(f"  => {impl} {method} {name}: {fmt_time(t_dattri)} vs fimoda {fmt_time(t_ours)} "
                  f"(x{t_dattri / t_ours:.3g}), mean cosine {cos:.4f} {note}, mem {fmt_bytes(rec['peak_mem_bytes'])}",
                  flush=True)
            summary.append((name, method, impl, t_ours, t_dattri, t_dattri / t_ours, cos, note))
            return out

        # DataInf: one scalar λ for both (dattri has no per-layer λ); also vs our per-layer default
        lam = lam0 / 10
        scal, scal_rec = measure(args, "datainf", "fimoda_scalar", attr("datainf", damping=lam), shape("datainf"),
                                 extra=dict(damping=lam))
        out = compare("datainf", "dattri", dattri_fn("datainf", model, train, test, device, regularization=lam),
                      scal, scal_rec, MAPPINGS["datainf"] + f"; λ₀/10 = {lam:.4g}", extra=dict(damping=lam))
        if out is not None and "datainf" in ours:
            c = mean_cos(out, ours["datainf"])
            print(f"  datainf {name}: cosine dattri(λ₀/10) vs fimoda default per-layer λ_l = {c:.4f}", flush=True)
            summary.append((name, "datainf", "dattri vs per-layer λ_l", None, None, None, c, ""))

        # CG: same λ, dattri given our iteration count
        if "cg" in ours:
            lam_cg = info["cg"]["damping"]
            iters = int(torch.as_tensor(info["cg"]["cg"]["iterations"]).max())
            extra = dict(damping=lam_cg, max_iter=iters)
            for impl, gn, mapping in (("dattri", False, MAPPINGS["cg"] + f"; λ = {lam_cg:.4g}, max_iter = {iters}"),
                                      ("dattri_gn", True, "as dattri cg, on the linearized loss (Hessian = G)")):
                if (gn and not dattri_gn) or (args.impl and impl not in args.impl):
                    continue
                make = lambda it, gn=gn: dattri_fn("cg", model, train, test, device, gn=gn,  # noqa: E731
                                                   regularization=lam_cg, max_iter=it)
                probe = linear_probe(f"{OP} {args.device} cg {impl} {name} (iteration probe)", make, most=iters)
                if probe is None:  # the first case has no previous one to predict from: probe
                    continue
                t1, per_iter, _ = probe
                predicted = t1 + per_iter * (iters - 1)
                if predicted > args.max_call_s:
                    print(f"SKIP {OP} {args.device} cg {impl} {name}: predicted {fmt_time(predicted)} per call "
                          f"({iters} iterations, from 1- and k-iteration runs) > --max-call-s {args.max_call_s:g}",
                          flush=True)
                    t_ours = recs["cg"]["median_s"]
                    summary.append((name, "cg", impl, t_ours, predicted, predicted / t_ours,
                                    None, f"not run: predicted {fmt_time(predicted)} > --max-call-s"))
                    continue
                compare("cg", impl, make(iters), ours["cg"], recs["cg"], mapping, extra=extra, predict=False)
        else:
            print(f"SKIP dattri cg {name}: no fimoda cg result", flush=True)

        # LiSSA: true Hessian in dattri -> compared with our lissa_h at the same d, s, batch, depth
        if args.impl and "dattri" not in args.impl:
            pass
        elif "lissa_h" in ours:
            # ours: absolute λ (torch-influence's damp); dattri's d is relative (effective d·s): d = λ/s
            d, s = info["lissa_h"]["lissa"]["damping"], float(info["lissa_h"]["lissa"]["scale"])
            depth = recs["lissa_h"]["extra"]["depth"]
            kw = dict(damping=d, scaling=s, batch_size=min(128, n))

            def dattri_lissa(dd):
                run = dattri_fn("lissa", model, train, test, device, recursion_depth=dd, **kw)

                def seeded():
                    torch.manual_seed(0)  # dattri draws its minibatches from the global generator
                    return run()
                return seeded
            probe = probe_depth(args, f"{OP} {args.device} lissa_h dattri {name} (depth probe)", dattri_lissa,
                                min(depth, target_depth))
            if probe is None:
                continue
            d_depth, probe = probe
            d_depth = min(d_depth, depth)
            ours_cmp, t_ours = ours["lissa_h"], recs["lissa_h"]["extra"]["extrapolated_s"]
            if d_depth < depth:  # ours again at dattri's depth, for the cosine
                ours_cmp = attr("lissa_h", depth=d_depth, scale=s)()
            extra = dict(damping=d, scale=s, depth=d_depth, target_depth=target_depth, compared_with="lissa_h")
            mapping = MAPPINGS["lissa_h"] + f"; d = {d:.4g}, s = {s:g}, depth = {d_depth}"
            print(f"  dattri lissa: {mapping}", flush=True)

            def post(out, t):
                t_d = extrapolate(t, d_depth, target_depth, probe)
                return dict(cos_vs_fimoda=mean_cos(out, ours_cmp), mapping=mapping, extrapolated_s=t_d,
                            time_ratio_vs_fimoda=t_d / t_ours)
            out, rec = measure(args, "lissa_h", "dattri", dattri_lissa(d_depth), shape("lissa_h"), extra=extra,
                               post=post, predict=False)
            if out is not None:
                t_d, cos = rec["extra"]["extrapolated_s"], rec["extra"]["cos_vs_fimoda"]
                cos_gn = mean_cos(out, ours["lissa"]) if "lissa" in ours else None
                note = (f"depth {d_depth}, times extrapolated to {target_depth}" if d_depth < target_depth else "")
                print(f"  => dattri lissa {name}: {fmt_time(t_d)} vs fimoda lissa_h {fmt_time(t_ours)} "
                      f"(x{t_d / t_ours:.3g}{', extrapolated to depth ' + str(target_depth) if note else ''}), "
                      f"mean cosine vs lissa_h {cos:.4f}"
                      + (f", vs lissa (GN) {cos_gn:.4f}" if cos_gn is not None else ""), flush=True)
                summary.append((name, "lissa_h", "dattri", t_ours, t_d, t_d / t_ours, cos, note))
            else:
                summary.append((name, "lissa_h", "dattri", t_ours, None, None, None, "skipped / failed"))
        else:
            print(f"SKIP dattri lissa {name}: no fimoda lissa_h result", flush=True)

    if summary:
        print("\nsummary (dattri vs fimoda; time ratio > 1: dattri slower; cosine: mean over test points)")
        print(f"{'case':<8} {'method':<9} {'impl':<24} {'fimoda':>9} {'dattri':>9} {'ratio':>8} {'cosine':>8}  note")
        for case, method, impl, t_o, t_d, ratio, cos, note in summary:
            print(f"{case:<8} {method:<9} {impl:<24} {fmt_time(t_o):>9} {fmt_time(t_d):>9} "
                  f"{'–' if ratio is None else f'{ratio:.3g}':>8} "
                  f"{'–' if cos is None else f'{cos:.4f}':>8}  {note}")
    return finish()


if __name__ == "__main__":
    sys.exit(main())
