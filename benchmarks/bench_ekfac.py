"""Benchmark EK-FAC influence (MATH.md §6): fimoda_kernels.EKFAC against kronfluence 1.0.1.

Same model, data, curvature (the empirical Fisher: kronfluence's ``use_empirical_fisher=True``, our
``curvature="empirical"``), strategy "ekfac" and damping (kronfluence's heuristic 0.1 × mean(Λ) per
layer, ``damping_factor=None`` there, ``damping=None`` here), float32 factors, float64 eigh, both.
Timed separately: fitting the factors (covariances, eigh, eigenvalue correction) and the pairwise
scores of n_train training points against 512 queries; impl 'reference' is kronfluence (so the
speedup column is ours vs kronfluence; end to end = factors + scores) and each record of ours stores the cosine (flattened score
matrices) and the mean per-query cosine with kronfluence's scores in ``extra``. Batch sizes: 512
for both (kronfluence's factor and training batches, our ``batch_size``); kronfluence's query batch
= all queries. Quick mode times with the harness's adaptive :func:`run_case`; full mode, whose
calls take tens of seconds on a CPU, times ``--repeats`` calls per phase after the untimed call
that produced the cosine, and records them through the harness.

    python benchmarks/bench_ekfac.py [--quick] [--device cpu|cuda] [--out DIR] [--repeats R] [--models mlp,cnn]
"""
import sys
import tempfile

import torch
import torch.nn.functional as F
from torch import nn

from harness import finish, parse_args, record, run_case

CASES = {"full": [("mlp", 8192, 512), ("cnn", 8192, 512)], "quick": [("mlp", 1024, 64), ("cnn", 512, 32)]}
BATCH = 512


def make_model(kind):
    torch.manual_seed(0)
    if kind == "mlp":  # 2 × 128 hidden
        return nn.Sequential(nn.Linear(32, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10)).eval()
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Flatten(), nn.Linear(32 * 4 * 4, 10)).eval()


def make_data(kind, n, gen):
    x = torch.randn(n, 32, generator=gen) if kind == "mlp" else torch.randn(n, 3, 16, 16, generator=gen)
    return x, torch.randint(0, 10, (n,), generator=gen)


def kronfluence_runner(model, x_tr, y_tr, x_te, y_te, workdir):
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.task import Task

    class ClassificationTask(Task):
        def compute_train_loss(self, batch, model, sample=False):
            x, y = batch
            logits = model(x)
            if sample:
                with torch.no_grad():
                    y = torch.multinomial(torch.softmax(logits.detach(), -1), 1).flatten()
            return F.cross_entropy(logits, y, reduction="sum")

        def compute_measurement(self, batch, model):
            x, y = batch
            return F.cross_entropy(model(x), y, reduction="sum")

    task = ClassificationTask()
    model = prepare_model(model, task)
    analyzer = Analyzer("bench_ekfac", model, task, cpu=not next(model.parameters()).is_cuda, disable_tqdm=True,
                        output_dir=workdir)
    train = torch.utils.data.TensorDataset(x_tr, y_tr)
    query = torch.utils.data.TensorDataset(x_te, y_te)
    factor_args = FactorArguments(strategy="ekfac", use_empirical_fisher=True)
    score_args = ScoreArguments(damping_factor=None)

    def fit():
        analyzer.fit_all_factors("f", train, per_device_batch_size=BATCH, factor_args=factor_args,
                                 overwrite_output_dir=True)

    def scores():
        analyzer.compute_pairwise_scores("s", "f", query, train, per_device_query_batch_size=len(query),
                                         per_device_train_batch_size=BATCH, score_args=score_args,
                                         overwrite_output_dir=True)
        return analyzer.load_pairwise_scores("s")["all_modules"]  # [n_query, n_train]

    return fit, scores


def cosines(ours, theirs):
    """(cosine of the flattened matrices, mean over queries of the per-query cosine); ours [n, m]."""
    a, b = ours.double().cpu().T, theirs.double().cpu()  # kronfluence may hand back CPU tensors
    flat = float(F.cosine_similarity(a.flatten(), b.flatten(), 0))
    return flat, float(F.cosine_similarity(a, b, 1).mean())


def main(argv=None) -> int:
    def options(p):
        p.add_argument("--repeats", type=int, default=3,
                       help="timed calls per phase in full mode (after one untimed warm-up)")
        p.add_argument("--models", default="mlp,cnn", help="comma-separated cases to run (mlp, cnn)")

    args = parse_args(__doc__, argv, options)
    import fimoda_kernels as fk

    device = torch.device(args.device)
    gen = torch.Generator().manual_seed(0)
    for kind, n, m in CASES[args.mode]:
        if kind not in args.models.split(","):
            continue
        model = make_model(kind).to(device)
        p = sum(q.numel() for q in model.parameters())
        x_tr, y_tr = (t.to(device) for t in make_data(kind, n, gen))
        x_te, y_te = (t.to(device) for t in make_data(kind, m, gen))
        shape = dict(model=kind, n_train=n, n_test=m, p=p)
        ek = fk.EKFAC(model, "cross_entropy", curvature="empirical", strategy="ekfac", damping=None)
        with tempfile.TemporaryDirectory() as workdir:
            kf_fit, kf_scores = kronfluence_runner(make_model(kind).to(device), x_tr, y_tr, x_te, y_te, workdir)
            kf_fit()
            theirs = kf_scores()
            ek.fit(x_tr, y_tr, batch_size=BATCH)
            ours = ek.scores(x_tr, y_tr, x_te, y_te, batch_size=BATCH)
            cos, cos_q = cosines(ours, theirs)
            print(f"# {kind}: score cosine vs kronfluence {cos:.6f} (mean per query {cos_q:.6f})", flush=True)
            extra = dict(cosine_vs_kronfluence=cos, mean_query_cosine_vs_kronfluence=cos_q)
            runs = {"reference": {"fit": kf_fit, "scores": kf_scores},
                    "ours": {"fit": lambda: ek.fit(x_tr, y_tr, batch_size=BATCH),
                             "scores": lambda: ek.scores(x_tr, y_tr, x_te, y_te, batch_size=BATCH)}}

            for impl, r in runs.items():
                ex = extra if impl == "ours" else {}
                if args.impl and impl not in args.impl:
                    continue
                if args.mode == "quick":  # the harness's adaptive timing with peak memory
                    a = run_case(args, "ekfac_factors", impl, r["fit"], shape=shape, dtype=torch.float32, extra=ex)
                    b = run_case(args, "ekfac_scores", impl, r["scores"], shape=shape, dtype=torch.float32,
                                 flops=2 * n * m * p, extra=ex)
                    fit_s, score_s = (x["median_s"] if x else float("nan") for x in (a, b))
                else:  # calls of tens of seconds: median of a few timed calls, each phase
                    fit_s, score_s = (_median_time(r[k], args.repeats) for k in ("fit", "scores"))
                    for op, t, flops in (("ekfac_factors", fit_s, None), ("ekfac_scores", score_s, 2 * n * m * p)):
                        record(op, impl, shape, torch.float32, args.device, dict(median_s=t, n=args.repeats),
                               flops=flops, peaks=args.peaks, extra=ex, out_dir=args.out, mode=args.mode)
                record("ekfac_end_to_end", impl, shape, torch.float32, args.device,
                       dict(median_s=fit_s + score_s, n=1), peaks=args.peaks, extra=ex, out_dir=args.out,
                       mode=args.mode)
    return finish()


def _median_time(fn, repeats):
    import statistics
    import time

    samples = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t)
    return statistics.median(samples)


if __name__ == "__main__":
    sys.exit(main())
