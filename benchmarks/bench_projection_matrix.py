"""Benchmark fimoda_kernels.projection_matrix (counter-based Philox P ∈ R^{p×k}, MATH.md §9).

Write-bound: the rate is GB/s of output written (p·k·4 bytes for float32) against the copy peak;
extra.philox_words_per_s counts 32-bit Philox output words consumed (1 per entry for Rademacher,
2 for Gaussian's Box–Muller pair). Every available backend is timed; 'torch' is reported as
'reference', the baseline of the speed-up ratios.

    python benchmarks/bench_projection_matrix.py [--quick] [--device cpu|cuda] [--out DIR]
"""
import sys

import torch

from harness import finish, parse_args, run_case

OP = "projection_matrix"
CASES = {"full": [(4096, 512), (65536, 2048), (1_000_000, 512)],
         "quick": [(1024, 128), (4096, 512)]}
KINDS = ("rademacher", "gaussian")
WORDS_PER_ENTRY = {"rademacher": 1, "gaussian": 2}
SEED = 0x1234_5678_9ABC_DEF0


def main(argv=None) -> int:
    args = parse_args(__doc__, argv)
    import fimoda_kernels as fk
    from fimoda_kernels.ops.projection_matrix import _projection_matrix_reference

    device = torch.device(args.device)
    dtype = torch.float32
    backends = fk.available_backends(OP, args.device)
    print(f"{OP}: backends available on {args.device}: {backends}", flush=True)
    for kind in KINDS:
        for p, k in CASES[args.mode]:
            impls = {("reference" if b == "torch" else b):
                     (lambda b=b: fk.projection_matrix(p, k, SEED, kind=kind, dtype=dtype, device=device, backend=b))
                     for b in backends}
            # the ratio needs a baseline even if the registry does not list the torch backend
            impls.setdefault("reference", lambda: _projection_matrix_reference(p, k, SEED, kind, 0, dtype, device))
            out_bytes = p * k * dtype.itemsize
            # run the reference first so each printed line can show its speed-up
            for impl in sorted(impls, key=lambda name: name != "reference"):
                run_case(args, OP, impl, impls[impl], shape=dict(kind=kind, p=p, k=k), dtype=dtype,
                         bytes=out_bytes, rates=dict(philox_words=p * k * WORDS_PER_ENTRY[kind]),
                         needs_bytes=4 * out_bytes)  # output + generous room for the reference's temporaries
    return finish()


if __name__ == "__main__":
    sys.exit(main())
