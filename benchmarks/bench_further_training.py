"""Benchmark the further-training engine (MATH.md §2) at the Energy scale of the paper.

Setup: 691 × 8 standardized random inputs (the Energy training set's shape), 77 test points,
MLP 8→128→128→1 (ReLU), MSE, SGD lr 0.03, batch 128, mode "remove", N_LOO = 100, 10 seeds,
5 epochs: 1010 runs. Impls:

- reference: the sequential protocol (one nn.Module copy per run, torch.optim.SGD, per-epoch
  randperm with the left-out index deleted, evaluation after each epoch); a subset of the runs is
  timed and the time scaled linearly to all runs (printed as 'extrapolated from k runs');
- fused: ``further_train`` (batched GEMMs + the fused optimizer op), all runs;
- generic: ``further_train(path="generic")`` (vmap(grad)), the runs of one seed, scaled linearly.

Work: model FLOPs 6 × (points per epoch) × weights per run and epoch (forward, weight and input
gradients) plus 2 × n_test × weights per evaluation, against the measured GEMM peak. Also reported:
models·steps/s and the projected time of the paper's full Energy study (101 × 100 runs, 500 epochs),
i.e. this case's time × 1000.

CPU time: on a shared (loaded) machine wall-clock times mostly measure the scheduler, so each impl's
process CPU time of one call (``time.process_time``) is reported too, with the GEMM peak measured
the same way (fp32 2048³ matmul, same thread count); with one thread (``OMP_NUM_THREADS=1``) CPU
seconds approximate the wall time on an idle core. The summary table at the end uses CPU time.

``--study`` instead runs the paper's whole Energy study once, fused fp32: 101 × 100 runs (N_LOO = 100,
100 seeds), ``--study-epochs`` epochs (500), evaluated every epoch, in chunks of ``--max-memory``
bytes (default: the library's 1 GiB on a CPU, 32 GiB on a GPU, where one chunk of all 10 100 models
keeps the device busy); the time of one call is recorded as op ``further_train_study``. Scaling
the small case linearly can overstate a GPU's time: the H200 ran the 1010-model case 4.5% busy, so its
time per step should grow far less than linearly with the models per chunk (this measures it).
``--study`` shows the progress bar (model·steps/s) on stderr, so a run cut short still gives its rate.

``--profile`` runs torch.profiler over one epoch of the fused fp32 case (all of its models in one chunk)
and prints the operators and kernels that take the most time: device time on a GPU, CPU time otherwise.

    python benchmarks/bench_further_training.py [--quick] [--device cpu|cuda] [--out DIR]
    python benchmarks/bench_further_training.py --study [--study-epochs E] [--max-memory BYTES] [--device cuda]
    python benchmarks/bench_further_training.py --profile [--device cuda]
"""
import copy
import sys
import time

import torch
from torch import nn

from harness import fmt_time, parse_args, record, run_case, time_fn, finish

N, D, N_TEST, HIDDEN, BATCH, LR = 691, 8, 77, 128, 128, 0.03
CASES = {"full": dict(n_loo=100, seeds=10, epochs=5, ref_runs=24, generic_runs=26),
         "quick": dict(n_loo=20, seeds=2, epochs=2, ref_runs=6, generic_runs=6)}
STUDY_RUNS, STUDY_EPOCHS = 101 * 100, 500  # the paper's Energy study


def energy_like(device, dtype):
    g = torch.Generator().manual_seed(0)
    X = torch.randn(N + N_TEST, D, generator=g, dtype=torch.float64)
    X = (X - X.mean(0)) / X.std(0)
    y = X @ torch.randn(D, 1, generator=g, dtype=torch.float64) + 0.1 * torch.randn(N + N_TEST, 1, generator=g, dtype=torch.float64)
    y = ((y - y.mean()) / y.std()).squeeze(1)
    X, y = X.to(device=device, dtype=dtype), y.to(device=device, dtype=dtype)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(D, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, HIDDEN), nn.ReLU(),
                          nn.Linear(HIDDEN, 1)).to(device=device, dtype=dtype)
    return model, (X[:N], y[:N]), (X[N:], y[N:])


def sequential(model, train, test, runs, epochs):
    """The paper's protocol for the given (seed, left-out index or None) runs."""
    X, Y = train
    Xt, Yt = test
    mse = nn.MSELoss(reduction="none")
    out = []
    for seed, i in runs:
        m = copy.deepcopy(model)
        opt = torch.optim.SGD(m.parameters(), lr=LR)
        g = torch.Generator().manual_seed(seed)
        for _ in range(epochs):
            perm = torch.randperm(N, generator=g).to(X.device)
            if i is not None:
                perm = perm[perm != i]
            m.train()
            for b in range(0, perm.numel(), BATCH):
                idx = perm[b:b + BATCH]
                loss = mse(m(X[idx]).squeeze(1), Y[idx]).mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
            m.eval()
            with torch.no_grad():
                out.append(mse(m(Xt).squeeze(1), Yt))
    return out


def cpu_seconds(fn, repeat: int = 1) -> float:
    """Process CPU time of one call (best of ``repeat``)."""
    best = float("inf")
    for _ in range(repeat):
        t = time.process_time()
        fn()
        best = min(best, time.process_time() - t)
    return best


def cpu_gemm_peak() -> float:
    """fp32 GEMM GFLOP per CPU-second (2048³ matmul, best of 3), the CPU-time analogue of the harness peak."""
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    torch.matmul(a, b)
    return 2 * 2048 ** 3 / cpu_seconds(lambda: torch.matmul(a, b), 3) / 1e9


def study(args) -> int:
    """The paper's full Energy study in one timed call (see the module doc)."""
    import fimoda_kernels as fk

    epochs = args.study_epochs
    max_memory = args.max_memory or (2**30 if args.device == "cpu" else 32 * 2**30)
    model, train, test = energy_like(args.device, torch.float32)
    loo, seeds = list(range(0, N, N // 100))[:100], list(range(100))
    weights = sum(p.numel() for p in model.parameters())
    nb_full, nb_loo = -(-N // BATCH), -(-(N - 1) // BATCH)
    model_steps = len(seeds) * (nb_full + len(loo) * nb_loo) * epochs
    points = len(seeds) * (N + len(loo) * (N - 1)) * epochs
    flops = 6 * points * weights + 2 * N_TEST * weights * STUDY_RUNS * (epochs + 1)

    def run(s, e):
        return fk.further_train(model, train, test, loo, s, epochs=e, lr=LR, batch_size=BATCH,
                                max_memory=max_memory, progress=progress)

    progress = False
    run(seeds[:2], 1)  # warm-up: kernels compiled, allocator primed
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    sync()
    progress = True
    t = time.perf_counter()
    result = run(seeds, epochs)
    sync()
    wall = time.perf_counter() - t
    if not bool(torch.isfinite(result.losses).all()):
        raise RuntimeError("further_train_study: non-finite test losses")
    shape = dict(n=N, d=D, hidden=HIDDEN, batch=BATCH, n_loo=len(loo), seeds=len(seeds), epochs=epochs)
    record("further_train_study", "fused", shape, torch.float32, args.device, dict(median_s=wall, n=1),
           flops=flops, peaks=args.peaks, out_dir=args.out, mode=args.mode,
           extra=dict(model_steps_per_s=model_steps / wall, max_memory=max_memory,
                      models_per_chunk=result.config["models_per_chunk"],
                      projected_500_epochs_s=wall * STUDY_EPOCHS / epochs))
    print(f"  full Energy study ({STUDY_RUNS} runs × {epochs} epochs): {fmt_time(wall)}, "
          f"{model_steps / wall:.0f} model·steps/s" + ("" if epochs == STUDY_EPOCHS else
                                                        f"; × {STUDY_EPOCHS / epochs:g} for 500 epochs: "
                                                        f"{fmt_time(wall * STUDY_EPOCHS / epochs)}"))
    return finish()


def profile(args) -> int:
    """torch.profiler over one epoch of the fused fp32 case (see the module doc)."""
    import fimoda_kernels as fk
    from torch.profiler import ProfilerActivity, profile as torch_profile

    case = CASES[args.mode]
    model, train, test = energy_like(args.device, torch.float32)
    loo, seeds = list(range(0, N, N // case["n_loo"]))[:case["n_loo"]], list(range(case["seeds"]))
    runs = (len(loo) + 1) * len(seeds)

    def fused():
        fk.further_train(model, train, test, loo, seeds, epochs=1, lr=LR, batch_size=BATCH, models_per_chunk=runs,
                         max_memory=2**40, progress=False)
        if args.device == "cuda":
            torch.cuda.synchronize()

    fused()  # warm-up
    cuda = args.device == "cuda"
    with torch_profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        t = time.perf_counter()
        fused()
        wall = time.perf_counter() - t
    steps = -(-N // BATCH)
    print(f"  {runs} models in one chunk, 1 epoch ({steps} steps): {fmt_time(wall)} under the profiler")
    print(prof.key_averages().table(sort_by="self_device_time_total" if cuda else "self_cpu_time_total",
                                    row_limit=25, max_name_column_width=60))
    return 0


def main(argv=None) -> int:
    def options(p):
        p.add_argument("--study", action="store_true", help="time the paper's whole Energy study once")
        p.add_argument("--study-epochs", type=int, default=STUDY_EPOCHS, help="epochs of --study (default 500)")
        p.add_argument("--max-memory", type=int, default=None,
                       help="further_train's max_memory for --study (default 1 GiB on cpu, 32 GiB on cuda)")
        p.add_argument("--profile", action="store_true", help="profile one epoch of the fused fp32 case")

    args = parse_args(__doc__, argv, options)
    if args.study:
        return study(args)
    if args.profile:
        return profile(args)
    import fimoda_kernels as fk

    cpu = args.device == "cpu"
    peak_cpu = cpu_gemm_peak() if cpu else None
    summary = []

    case = CASES[args.mode]
    n_loo, n_seeds, epochs = case["n_loo"], case["seeds"], case["epochs"]
    runs = (n_loo + 1) * n_seeds
    weights = D * HIDDEN + HIDDEN + HIDDEN * HIDDEN + HIDDEN + HIDDEN + 1
    nb_full, nb_loo = -(-N // BATCH), -(-(N - 1) // BATCH)
    model_steps = n_seeds * (nb_full + n_loo * nb_loo) * epochs
    points = n_seeds * (N + n_loo * (N - 1)) * epochs
    flops = 6 * points * weights + 2 * N_TEST * weights * runs * (epochs + 1)
    shape = dict(n=N, d=D, hidden=HIDDEN, batch=BATCH, n_loo=n_loo, seeds=n_seeds, epochs=epochs)
    scale_study = STUDY_RUNS * STUDY_EPOCHS / (runs * epochs)
    loo = list(range(0, N, N // n_loo))[:n_loo]
    seeds = list(range(n_seeds))

    for dtype in (torch.float32, torch.float64):
        model, train, test = energy_like(args.device, dtype)
        # reference: a subset of the runs (the full run and LOO runs of the first seeds), scaled linearly
        k = case["ref_runs"]
        subset = [(s, i) for s in seeds for i in [None] + loo][:k]
        if not args.impl or "reference" in args.impl:
            stats = time_fn(lambda: sequential(model, train, test, subset, epochs), device=args.device,
                            **{**args.timing, "min_repeat": 1})
            factor = runs / k
            stats = {**stats, "median_s": stats["median_s"] * factor, "min_s": stats["min_s"] * factor,
                     "iqr_s": stats["iqr_s"] and stats["iqr_s"] * factor}
            rec = record("further_train", "reference", shape, dtype, args.device, stats, flops=flops,
                         peaks=args.peaks, out_dir=args.out, mode=args.mode,
                         extra=dict(extrapolated_from_runs=k, runs=runs, model_steps_per_s=model_steps / stats["median_s"],
                                    projected_study_s=stats["median_s"] * scale_study))
            print(f"  reference: extrapolated from {k} of {runs} runs; {model_steps / stats['median_s']:.0f} "
                  f"model·steps/s; projected full Energy study {fmt_time(stats['median_s'] * scale_study)}")
            if cpu:
                summary.append(("reference", dtype, factor * cpu_seconds(
                    lambda: sequential(model, train, test, subset, epochs)), f"extrapolated from {k} runs"))

        def fused():
            return fk.further_train(model, train, test, loo, seeds, epochs=epochs, lr=LR, batch_size=BATCH,
                                    dtype=dtype, progress=False)

        rec = run_case(args, "further_train", "fused", fused, shape=shape, dtype=dtype, flops=flops,
                       rates=dict(model_steps=model_steps))
        if rec:
            t = rec["median_s"]
            print(f"  fused: {model_steps / t:.0f} model·steps/s, {rec['frac_gemm_peak']:.1%} of the GEMM peak; "
                  f"projected full Energy study {fmt_time(t * scale_study)}")
            if cpu:
                summary.append(("fused", dtype, cpu_seconds(fused), "all runs"))

        g_runs = case["generic_runs"]  # the full run and g_runs - 1 LOO runs of one seed, scaled linearly
        one_seed = loo[:g_runs - 1]

        def generic():
            return fk.further_train(model, train, test, one_seed, seeds[:1], epochs=epochs, lr=LR, batch_size=BATCH,
                                    dtype=dtype, progress=False, path="generic")

        if not args.impl or "generic" in args.impl:
            stats = time_fn(generic, device=args.device, **{**args.timing, "min_repeat": 1})
            factor = runs / g_runs
            stats = {**stats, "median_s": stats["median_s"] * factor, "min_s": stats["min_s"] * factor,
                     "iqr_s": stats["iqr_s"] and stats["iqr_s"] * factor}
            record("further_train", "generic", shape, dtype, args.device, stats, flops=flops, peaks=args.peaks,
                   out_dir=args.out, mode=args.mode,
                   extra=dict(extrapolated_from_runs=g_runs, model_steps_per_s=model_steps / stats["median_s"],
                              projected_study_s=stats["median_s"] * scale_study))
            if cpu:
                summary.append(("generic", dtype, factor * cpu_seconds(generic), f"extrapolated from {g_runs} runs"))

    if summary:
        print(f"\nCPU time ({torch.get_num_threads()} thread(s)); GEMM peak {peak_cpu:.1f} GFLOP per CPU-second "
              f"(fp32 2048³); full Energy study = this case × {scale_study:g}")
        print(f"{'impl':<10} {'dtype':<8} {'CPU s':>9} {'model·steps/s':>14} {'GFLOP/s':>8} {'of peak':>8} "
              f"{'speed-up':>9} {'study':>10}  note")
        ref = {d: c for i, d, c, _ in summary if i == "reference"}
        for impl, dtype, c, note in summary:
            up = f"{ref[dtype] / c:.2f}x" if dtype in ref else "–"
            print(f"{impl:<10} {str(dtype)[6:]:<8} {c:9.2f} {model_steps / c:14.0f} {flops / c / 1e9:8.2f} "
                  f"{flops / c / 1e9 / peak_cpu:8.1%} {up:>9} {fmt_time(c * scale_study):>10}  {note}")
    return finish()


if __name__ == "__main__":
    sys.exit(main())
