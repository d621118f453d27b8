"""Benchmark fimoda_kernels.ops.project: ``project`` (grads [n, p] -> [n, k]) and ``project_linear``
(one Linear layer from its inputs and output gradients), P generated on the fly (MATH.md §9).

Work: 2·n·p·k FLOPs per call (the product grads @ P), rate in GFLOP/s against the measured fp32
GEMM peak. Implementations (float32 inputs; impls of a case run in this order):

  project (cases small -> large by FLOPs; Rademacher, plus Gaussian for one mid case)
    reference   backend "torch" (float64 pure-torch Philox; only where p·k <= REF_MAX_PK: slow)
    gemm_limit  torch.matmul(grads, P), P [p, k] float32 = projection_matrix(...) materialized in the
                untimed first call: the speed limit (skipped when P would not fit comfortably)
    traker      trak.projectors.BasicProjector (traker==0.3.2, the `bench` extra; peer), built in the
                untimed first call; block_size = min(100, k // 2) < k so every call regenerates P
                (with block_size >= k it keeps one P block for good and is just a GEMM)
    cpu         backend "cpu" (on --device cuda: every available non-torch backend, e.g. cuda, triton)
  project_linear (MLP layer d_in = d_out = 1024 with bias, k = 2048, n in {256, 1024})
    materialize_then_project  per-sample gradients [n, d_out·d_in + d_out] formed with einsum + cat
                (as _linear_grads_reference does, in float32), then project(..., backend="cpu")
                (the fastest non-torch backend of the device)
    traker      the same materialization, then BasicProjector.project
    cpu         project_linear(..., backend="cpu") (cuda: as for project)

extra (a record is written as soon as its impl is timed, so ratios to impls timed earlier in the
case go through run_case's ``rates``: ``<name>_per_s`` = that count / this impl's median):
``gemm_limit_s`` = gemm_limit's median and ``gemm_limit_s_per_s`` = gemm_limit time / impl time, the
fraction of the speed limit reached (project; the cpu goal "within 1.3x" is >= 0.77);
``materialize_s(_per_s)`` likewise vs materialize_then_project (project_linear); on cpu rows
``traker_s_per_s`` = traker time / cpu time (goal >= 2); ``mem_model_bytes`` = n·k·4 + P tile(s)
of 16 MiB, the documented bound of the cpu path's extra memory; ``resident_bytes`` = memory an
impl holds between calls, not in its peak mem (gemm_limit's P, traker's P block).
The script ends with a summary: cpu time / baseline time, traker time / cpu time, cpu peak mem.

Each backend's output is checked (untimed) against gemm_limit on the first case of each kind and
against materialize_then_project on the first linear case (relative error < 1e-4, else exit 1).
Full mode caps each call at --max-call-s (default here 15 s, not the harness's 30 s: 2-core CPUs
would take hours otherwise) and stops starting new cases after --time-limit seconds (23 min on CPU,
2 min on CUDA to fit gpu_check.sh's 150 s step); most large cases are skipped on a small CPU, each
with a SKIP line. --quick: tiny cases, < 20 s.

    python benchmarks/bench_projection.py [--quick] [--device cpu|cuda] [--impl a,b] [--out DIR]
"""
import gc
import sys
import time

import torch

from harness import finish, fmt_bytes, fmt_shape, parse_args, run_case

SEED = 0x1234_5678_9ABC_DEF0
MAX_CALL_S = 15.0  # this script's --max-call-s default (both modes; the harness's quick default is 10)
TIME_LIMIT_S = {"full": 23 * 60.0, "full-cuda": 120.0, "quick": 60.0}  # full-cuda: gpu_check.sh gives 150 s
GiB = 1 << 30

# project: (kind, n, p, k), run sorted by FLOPs (the harness predicts a case's time from the same
# impl's previous one); full = the grid n x p x k, Rademacher, plus Gaussian for one mid case.
CASES = {
    "full": [("rademacher", n, p, k) for n in (256, 1024, 4096) for p in (100_000, 1_000_000)
             for k in (512, 2048, 8192)] + [("gaussian", 1024, 100_000, 2048)],
    # quick: p = 20000 at k = 512 spans several 16 MiB P tiles of the cpu path
    "quick": [("rademacher", 64, 1024, 256), ("rademacher", 64, 20_000, 512), ("gaussian", 64, 8192, 512)],
}
REF_MAX_PK = {"full": 100_000 * 512, "quick": 1024 * 256}  # reference only where p·k <= this
# project_linear: (n, d_in, d_out, k), bias on; quick shrinks the layer too (traker: ~1 s a call at 256x256)
LINEAR_CASES = {"full": [(256, 1024, 1024, 2048), (1024, 1024, 1024, 2048)],
                "quick": [(64, 96, 96, 512)]}


class Lazy:
    """A value built by its first use, i.e. in the harness's untimed cold call, and only if some impl
    runs at all (a skipped case allocates nothing)."""

    def __init__(self, make, nbytes: int = 0):
        self.make, self.nbytes, self.value = make, nbytes, None

    def __call__(self):
        if self.value is None:
            self.value = self.make()
        return self.value

    def pending_bytes(self) -> int:
        return 0 if self.value is not None else self.nbytes

    def drop(self) -> None:
        self.value = None


def _traker():
    try:
        from trak.projectors import BasicProjector, ProjectionType
    except Exception as e:  # noqa: BLE001 - optional peer: any import failure means "missing"
        print(f"traker: peer missing ({type(e).__name__}: {e}); `pip install traker==0.3.2` "
              "(the `bench` extra) to compare with BasicProjector", flush=True)
        return None

    def make(p, k, kind, device):
        return BasicProjector(p, k, 0, ProjectionType.rademacher if kind == "rademacher" else ProjectionType.normal,
                              device=device, block_size=min(100, k // 2), dtype=torch.float32)
    return make


def _fast_jl(device):
    """traker's CudaProjector (the fast_jl CUDA extension) on --device cuda, or None where missing.
    It needs k % 512 == 0 and float16/float32 grads; its P depends on the GPU's SM count."""
    if torch.device(device).type != "cuda":
        return None
    try:
        from trak.projectors import CudaProjector, ProjectionType
        import fast_jl  # noqa: F401 - CudaProjector imports it lazily; fail here, not mid-benchmark
    except Exception as e:  # noqa: BLE001 - optional peer
        print(f"fast_jl: peer missing ({type(e).__name__}: {e})", flush=True)
        return None

    def make(p, k, kind, device):
        return CudaProjector(p, k, 0, ProjectionType.rademacher if kind == "rademacher" else ProjectionType.normal,
                             device=device, max_batch_size=32)
    return make


def _vs(extra: dict, **baseline_s) -> dict:
    """run_case kwargs recording ratios to impls timed earlier in the case: extra[<name>_s] = their
    median, and via ``rates`` extra[<name>_s_per_s] = their median / this impl's median."""
    base = {f"{name}_s": t for name, t in baseline_s.items() if t}
    return dict(extra=dict(extra, **base), rates=base)


def _cleanup(*lazies):
    for z in lazies:
        z.drop()
    gc.collect()


def _rel_err(x, y) -> float:
    return float((x.double() - y.double()).norm() / y.double().norm())


def main(argv=None) -> int:
    args = parse_args(__doc__, argv, add_arguments=lambda p: (
        p.set_defaults(max_call_s=MAX_CALL_S),
        p.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32",
                       help="grads / layer inputs dtype (gemm_limit multiplies in it; traker runs on float32 only)"),
        p.add_argument("--n", default=None, help="comma-separated n values: run only those cases"),
        p.add_argument("--ops", default="project,project_linear",
                       help="comma-separated ops to run (project, project_linear)"),
        p.add_argument("--time-limit", type=float, default=None,
                       help="start no new case after this many seconds (default: full cpu "
                            f"{TIME_LIMIT_S['full']:g}, full cuda {TIME_LIMIT_S['full-cuda']:g}, "
                            f"quick {TIME_LIMIT_S['quick']:g})")))
    import fimoda_kernels as fk
    from fimoda_kernels.ops import project as project_mod  # also registers the ops "project", "project_linear"
    from fimoda_kernels.ops.project import project as _project, project_linear as _project_linear

    def fused(fn):  # backend "cuda_fused": the cuda backend with its tensor-core path switched off
        def call(*a, backend=None, **kw):
            if backend != "cuda_fused":
                return fn(*a, backend=backend, **kw)
            saved, project_mod.USE_TENSOR_CORES = project_mod.USE_TENSOR_CORES, False
            try:
                return fn(*a, backend="cuda", **kw)
            finally:
                project_mod.USE_TENSOR_CORES = saved
        return call

    project, project_linear = fused(_project), fused(_project_linear)

    t_start = time.perf_counter()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    time_limit = args.time_limit or TIME_LIMIT_S[args.mode if args.quick or device.type == "cpu" else "full-cuda"]
    tile_bytes = project_mod._TILE_BYTES
    make_traker = _traker() if dtype == torch.float32 else None  # BasicProjector multiplies in float32 only
    make_fast_jl = _fast_jl(device)
    ours = {}  # op -> our backends on this device ("torch" is timed as "reference")
    for op_name in ("project", "project_linear"):
        backends = fk.available_backends(op_name, args.device)
        ours[op_name] = [b for b in backends if b != "torch"]
        if "cuda" in backends and dtype != torch.float64:  # also the fused FMA kernel the tensor cores replace
            ours[op_name].append("cuda_fused")
        print(f"{op_name}: backends available on {args.device}: {backends}", flush=True)
    gen = torch.Generator(device=device).manual_seed(0)

    def selected(backends):  # the backends --impl lets run (all by default)
        return [b for b in backends if not args.impl or b in args.impl]
    failures, summary, checked = [], [], set()

    def out_of_time(label) -> bool:
        if time.perf_counter() - t_start > time_limit:
            print(f"SKIP {label}: past --time-limit {time_limit:g} s", flush=True)
            return True
        return False

    def check(what, err, vs):
        print(f"check {what}: vs {vs} rel. error {err:.2e}", flush=True)
        if not err < 1e-4:
            failures.append(f"{what}: differs from {vs} (rel. error {err:.2e})")

    def mem_model(backend, n_tiles, out_bytes):  # the cpu path's documented extra memory
        return dict(mem_model_bytes=out_bytes + n_tiles * tile_bytes) if backend == "cpu" else {}

    # ----------------------------------------------------------------------------- project
    cases = sorted(CASES[args.mode], key=lambda case: (case[1] * case[2] * case[3], case[0] != "rademacher"))
    keep = {int(v) for v in args.n.split(",")} if args.n else None
    ops = set(args.ops.split(","))
    if not ops <= {"project", "project_linear"}:
        raise SystemExit(f"--ops: expected names from project, project_linear, got {args.ops!r}")
    if keep:
        cases = [c for c in cases if c[1] in keep]
    if "project" not in ops:
        cases = []
    for kind, n, p, k in cases:
        shape, flops = dict(kind=kind, n=n, p=p, k=k), 2 * n * p * k
        if out_of_time(f"project {fmt_shape(shape)}"):
            continue
        G = Lazy(lambda n=n, p=p: torch.randn(n, p, generator=gen, device=device).to(dtype), n * p * dtype.itemsize)
        P = Lazy(lambda p=p, k=k, kind=kind: fk.projection_matrix(p, k, SEED, kind, dtype=dtype, device=device),
                 p * k * dtype.itemsize)
        out_bytes = n * k * 4
        common = dict(shape=shape, dtype=dtype, flops=flops)
        recs = {}
        if p * k <= REF_MAX_PK[args.mode]:
            recs["reference"] = run_case(args, "project", "reference",
                                         lambda: project(G(), k, SEED, kind, backend="torch"),
                                         needs_bytes=G.pending_bytes() + 2 * n * k * 8 + GiB, **common)
        # P must fit with room to spare: grads (if not yet built) + P + output + 2 GiB headroom
        recs["gemm_limit"] = run_case(args, "project", "gemm_limit", lambda: torch.matmul(G(), P()),
                                      needs_bytes=G.pending_bytes() + P.nbytes + out_bytes + 2 * GiB,
                                      extra=dict(resident_bytes=P.nbytes), **common)
        t_gemm = recs["gemm_limit"] and recs["gemm_limit"]["median_s"]
        if kind not in checked and P.value is not None:
            checked.add(kind)  # the same P on both sides: equal up to float32 summation order
            # vs float32 products of the same inputs (a float16/bfloat16 gemm_limit rounds its output)
            want = torch.matmul(G().float(), fk.projection_matrix(p, k, SEED, kind, device=device))
            for b in selected(ours["project"]):
                check(f"project {kind} n={n} p={p} k={k} {b}",
                      _rel_err(project(G(), k, SEED, kind, backend=b), want), "float32 G @ P")
            del want
        P.drop()
        gc.collect()
        if make_traker is not None:
            proj = Lazy(lambda p=p, k=k, kind=kind: make_traker(p, k, kind, device))
            blk = min(100, k // 2)
            recs["traker"] = run_case(args, "project", "traker", lambda: proj().project(G(), model_id=0),
                                      needs_bytes=G.pending_bytes() + p * blk * 4 + 2 * out_bytes + n * blk * 8 + GiB,
                                      **_vs(dict(block_size=blk, resident_bytes=p * blk * 4), gemm_limit=t_gemm),
                                      **common)
            proj.drop()
        if make_fast_jl is not None and k % 512 == 0 and dtype in (torch.float16, torch.float32):
            proj = Lazy(lambda p=p, k=k, kind=kind: make_fast_jl(p, k, kind, device))
            recs["fast_jl"] = run_case(args, "project", "fast_jl", lambda: proj().project(G(), model_id=0),
                                       needs_bytes=G.pending_bytes() + 2 * out_bytes + GiB,
                                       **_vs({}, gemm_limit=t_gemm), **common)
            proj.drop()
        t_traker = recs.get("traker") and recs["traker"]["median_s"]
        t_fast_jl = recs.get("fast_jl") and recs["fast_jl"]["median_s"]
        for b in ours["project"]:
            recs[b] = run_case(args, "project", b, lambda b=b: project(G(), k, SEED, kind, backend=b),
                               needs_bytes=G.pending_bytes() + out_bytes + tile_bytes + GiB // 4,
                               **_vs(mem_model(b, 1, out_bytes), gemm_limit=t_gemm, traker=t_traker, fast_jl=t_fast_jl),
                               **common)
        summary.append(("project", shape, recs, ours["project"], t_gemm, t_traker))
        _cleanup(G)

    # ----------------------------------------------------------------------------- project_linear
    kind = "rademacher"
    for n, d_in, d_out, k in LINEAR_CASES[args.mode] if "project_linear" in ops else ():
        if keep and n not in keep:
            continue
        p = d_out * d_in + d_out
        shape, flops = dict(kind=kind, n=n, d_in=d_in, d_out=d_out, bias=True, k=k), 2 * n * p * k
        if out_of_time(f"project_linear {fmt_shape(shape)}") or not ours["project"]:
            continue
        a = torch.randn(n, d_in, generator=gen, device=device).to(dtype)
        s = torch.randn(n, d_out, generator=gen, device=device).to(dtype)

        def materialize(a=a, s=s):  # [n, d_out·d_in + d_out]: weight (row-major) then bias, T = 1
            return torch.cat([torch.einsum("no,nc->noc", s, a).flatten(1), s], 1)

        out_bytes, mat_bytes, fastest = n * k * 4, n * p * 4, ours["project"][0]
        common = dict(shape=shape, dtype=dtype, flops=flops)
        recs = {}
        recs["materialize_then_project"] = run_case(
            args, "project_linear", "materialize_then_project",
            lambda: project(materialize(), k, SEED, kind, backend=fastest),
            needs_bytes=2 * mat_bytes + out_bytes + tile_bytes + GiB, extra=dict(project_backend=fastest), **common)
        t_mat = recs["materialize_then_project"] and recs["materialize_then_project"]["median_s"]
        if make_traker is not None:
            proj = Lazy(lambda p=p, k=k: make_traker(p, k, kind, device))
            blk = min(100, k // 2)
            recs["traker"] = run_case(args, "project_linear", "traker",
                                      lambda: proj().project(materialize(), model_id=0),
                                      needs_bytes=2 * mat_bytes + p * blk * 4 + 2 * out_bytes + GiB,
                                      **_vs(dict(block_size=blk, resident_bytes=p * blk * 4,
                                                 note="time includes the materialization"), materialize=t_mat),
                                      **common)
            proj.drop()
        t_traker = recs.get("traker") and recs["traker"]["median_s"]
        for b in ours["project_linear"]:
            recs[b] = run_case(args, "project_linear", b,
                               lambda b=b: project_linear(a, s, k, SEED, bias=True, kind=kind, backend=b),
                               needs_bytes=out_bytes + 2 * tile_bytes + GiB // 4,
                               **_vs(mem_model(b, 2, out_bytes), materialize=t_mat, traker=t_traker), **common)
        if "linear" not in checked and (not args.impl or "materialize_then_project" in args.impl):
            checked.add("linear")
            want = project(materialize(a.float(), s.float()), k, SEED, kind, backend=fastest)  # float32 products
            for b in selected(ours["project_linear"]):
                check(f"project_linear n={n} d={d_in}x{d_out} k={k} {b}",
                      _rel_err(project_linear(a, s, k, SEED, bias=True, kind=kind, backend=b), want),
                      "materialize_then_project")
        summary.append(("project_linear", shape, recs, ours["project_linear"], t_mat, t_traker))
        del a, s
        gc.collect()

    _print_summary(summary)
    print(f"total {time.perf_counter() - t_start:.0f} s", flush=True)
    rc = finish()
    for f in failures:
        print(f"FAIL {f}", file=sys.stderr)
    return rc or (1 if failures else 0)


def _print_summary(summary) -> None:
    """Our backends vs the speed limit (gemm_limit; materialize_then_project for project_linear) and traker."""
    print("\nsummary: time / baseline time (baseline: gemm_limit for project, goal <= 1.3; "
          "materialize_then_project for project_linear), traker time / time (goal >= 2), peak mem "
          "(cpu: model n·k·4 + P tile(s))")
    for op_name, shape, recs, backends, t_base, t_traker in summary:
        label = f"{op_name} " + " ".join(f"{k}={v}" for k, v in shape.items() if k != "bias")
        for b in backends:
            rec = recs.get(b)
            if not rec:
                print(f"  {label:<52} {b:<6} skipped")
                continue
            t = rec["median_s"]
            base = f"{t / t_base:5.2f}x" if t_base else "  –  "
            trk = f"{t_traker / t:5.2f}x" if t_traker else "  –  "
            model = rec["extra"].get("mem_model_bytes")
            print(f"  {label:<52} {b:<6} {t:8.3f} s  vs base {base}  traker/{b} {trk}  "
                  f"mem {fmt_bytes(rec.get('peak_mem_bytes'))}" + (f" (model {fmt_bytes(model)})" if model else ""))


if __name__ == "__main__":
    sys.exit(main())
