"""Benchmark Grad-Dot / Grad-Cos (MATH.md §3-§4).

Model cases: ``grad_dot_model`` (factored per-layer kernels) against the way the paper's code and
captum compute it — materialize per-sample gradients with torch.func, then one matmul (impl
'reference'; train gradients materialized in chunks of 256 samples so the wide model fits in
memory). Rate: the materialized form's FLOPs 2·n·m·p (the work the factored form avoids), so the
fraction of peak above 1 is the factored form's gain.
Dense cases: ``grad_dot`` on projected gradients ([n, k] · [m, k]ᵀ), every backend; 'reference' is
the float64 torch path. Rate 2·n·m·k FLOPs against the measured GEMM peak.

    python benchmarks/bench_grad_dot.py [--quick] [--device cpu|cuda] [--out DIR]
"""
import sys

import torch
from torch import nn

from harness import finish, parse_args, run_case

# (name, widths, task, n_train, n_test); cases small to large per impl
MODEL_CASES = {
    "full": [("mlp64", (64, 128, 128, 1), "mse", 8192, 512),
             ("mlp1024", (1024, 1024, 1024, 10), "cross_entropy", 1024, 512),
             ("mlp1024", (1024, 1024, 1024, 10), "cross_entropy", 8192, 512)],
    "quick": [("mlp64", (64, 128, 128, 1), "mse", 512, 64),
              ("mlp256", (256, 256, 256, 10), "cross_entropy", 256, 32)],
}
DENSE_CASES = {"full": [(8192, 512, 2048), (65536, 512, 2048)], "quick": [(2048, 128, 512)]}


def mlp(widths):
    layers = []
    for a, b in zip(widths, widths[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers[:-1]).eval()


def materialized(fk, model, task, x_tr, y_tr, x_te, y_te, chunk=256):
    """Per-sample gradients via torch.func, then matmul: the paper's / captum's way."""
    g_te = fk.per_sample_grads(model, task, x_te, y_te)
    out = torch.empty(x_tr.shape[0], x_te.shape[0])
    for i in range(0, x_tr.shape[0], chunk):
        out[i:i + chunk] = fk.per_sample_grads(model, task, x_tr[i:i + chunk], y_tr[i:i + chunk]) @ g_te.T
    return out


def main(argv=None) -> int:
    args = parse_args(__doc__, argv)
    import fimoda_kernels as fk

    device = torch.device(args.device)
    gen = torch.Generator().manual_seed(0)
    for name, widths, task, n, m in MODEL_CASES[args.mode]:
        torch.manual_seed(0)
        model = mlp(widths).to(device)
        p = sum(q.numel() for q in model.parameters())
        x = torch.randn(n + m, widths[0], generator=gen).to(device)
        y = (torch.randn(n + m, generator=gen) if task == "mse"
             else torch.randint(0, widths[-1], (n + m,), generator=gen)).to(device)
        tr, te = (x[:n], y[:n]), (x[n:], y[n:])
        impls = {"reference": lambda: materialized(fk, model, task, *tr, *te),
                 "factored": lambda: fk.grad_dot_model(model, task, tr, te),
                 "factored_cos": lambda: fk.grad_dot_model(model, task, tr, te, normalize=True)}
        for impl, fn in impls.items():
            run_case(args, "grad_dot_model", impl, fn, shape=dict(model=name, n_train=n, n_test=m, p=p),
                     dtype=torch.float32, flops=2 * n * m * p, needs_bytes=4 * (n * m + 256 * p + m * p) * 2)
    for n, m, k in DENSE_CASES[args.mode]:
        tr, te = torch.randn(n, k, generator=gen).to(device), torch.randn(m, k, generator=gen).to(device)
        for normalize in (False, True):
            backends = fk.available_backends("grad_dot", args.device)
            impls = {("reference" if b == "torch" else b): (lambda b=b: fk.grad_dot(tr, te, normalize, backend=b))
                     for b in backends}
            for impl in sorted(impls, key=lambda i: i != "reference"):
                run_case(args, "grad_dot", impl, impls[impl], shape=dict(n=n, m=m, d=k, cos=normalize),
                         dtype=torch.float32, flops=2 * n * m * k, needs_bytes=8 * (n * k + n * m) * 2)
        run_case(args, "grad_dot", "cpu_topk10" if args.device == "cpu" else "topk10",
                 lambda: fk.grad_dot(tr, te, topk=10), shape=dict(n=n, m=m, d=k, cos=False),
                 dtype=torch.float32, flops=2 * n * m * k)
    return finish()


if __name__ == "__main__":
    sys.exit(main())
