"""Benchmark fimoda_kernels.ops.conv_patches (Conv2d input patches with the bias column, the capture's
``a`` for every Conv2d layer).

Memory-bound: the rate is GB/s of output written plus input read (N·Ho·Wo·(C·kh·kw + 1) + N·C·H·W
elements) against the copy peak. 'reference' is the torch path (F.unfold, a transposing copy, the
bias column concatenated); 'cpu' the native single pass. Cases: the two conv layers of
bench_ekfac's CNN at batch 512, and a wider 64-channel 32×32 layer at batch 128.

    python benchmarks/bench_conv_patches.py [--quick] [--device cpu|cuda] [--out DIR]
"""
import sys

import torch

from harness import finish, parse_args, run_case

OP = "conv_patches"
# (N, C, H, W), kernel 3, stride 1, padding 1
CASES = {"full": [(512, 3, 16, 16), (512, 16, 8, 8), (128, 64, 32, 32)],
         "quick": [(64, 3, 16, 16), (64, 16, 8, 8)]}


def main(argv=None) -> int:
    args = parse_args(__doc__, argv)
    import fimoda_kernels as fk
    from fimoda_kernels.ops.conv_patches import conv_patches

    device, dtype = torch.device(args.device), torch.float32
    backends = fk.available_backends(OP, args.device)
    print(f"{OP}: backends available on {args.device}: {backends}", flush=True)
    gen = torch.Generator(device=device).manual_seed(0)
    for N, C, H, W in CASES[args.mode]:
        x = torch.randn(N, C, H, W, generator=gen, device=device, dtype=dtype)
        moved = (N * H * W * (C * 9 + 1) + x.numel()) * dtype.itemsize
        for b in sorted(backends, key=lambda name: name != "torch"):  # the reference first
            run_case(args, OP, "reference" if b == "torch" else b,
                     lambda b=b: conv_patches(x, 3, 1, 1, 1, True, backend=b),
                     shape=dict(N=N, C=C, H=H, W=W, k=3), dtype=dtype, bytes=moved, needs_bytes=3 * moved)
    return finish()


if __name__ == "__main__":
    sys.exit(main())
