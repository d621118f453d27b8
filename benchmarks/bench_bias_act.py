"""Benchmark fimoda_kernels.ops.bias_act / bias_act_backward (the hidden-layer epilogues of the fused
further-training MLP).

Memory-bound: the rate is GB/s of z (forward: read and written) or of g and h (backward: g read and
written, h read) against the copy peak. 'reference' is the torch backend (separate passes: the bias
broadcast then the activation; the derivative then the column sum); 'torch_aten' the passes the engine
made before (forward: baddbmm's bias copy is not counted here, so the activation alone, ``relu_``;
backward: aten's ``threshold_backward`` into g, then ``sum``); 'cpu' the native single pass. Cases:
the Energy MLP's 128-wide hidden layers for a chunk of 64 models at batch 128, and a wider 512 layer
for 256 models.

    python benchmarks/bench_bias_act.py [--quick] [--device cpu|cuda] [--out DIR]
"""
import sys

import torch

from harness import finish, parse_args, run_case

# (M models, R rows, C features)
CASES = {"full": [(64, 128, 128), (256, 128, 512)], "quick": [(16, 128, 128)]}


def main(argv=None) -> int:
    args = parse_args(__doc__, argv)
    import fimoda_kernels as fk
    from fimoda_kernels.ops.bias_act import bias_act, bias_act_backward

    device, dtype = torch.device(args.device), torch.float32
    aten = torch.ops.aten
    gen = torch.Generator(device=device).manual_seed(0)
    for op in ("bias_act", "bias_act_backward"):
        backends = fk.available_backends(op, args.device)
        print(f"{op}: backends available on {args.device}: {backends}", flush=True)
        for M, R, C in CASES[args.mode]:
            z = torch.randn(M, R, C, generator=gen, device=device, dtype=dtype)
            b = torch.randn(M, C, generator=gen, device=device, dtype=dtype)
            g, h = torch.randn_like(z), torch.randn_like(z).clamp_(min=0)
            gb = torch.empty_like(b)
            shape = dict(M=M, R=R, C=C, act="relu")
            if op == "bias_act":
                moved = 2 * z.numel() * dtype.itemsize
                impls = [("torch_aten", lambda: z.relu_())]
                impls += [("reference" if bk == "torch" else bk, lambda bk=bk: bias_act(z, b, "relu", backend=bk))
                          for bk in sorted(backends, key=lambda name: name != "torch")]
            else:
                moved = 3 * z.numel() * dtype.itemsize
                impls = [("torch_aten", lambda: (aten.threshold_backward.grad_input(g, h, 0, grad_input=g),
                                                 torch.sum(g, 1, out=gb)))]
                impls += [("reference" if bk == "torch" else bk,
                           lambda bk=bk: bias_act_backward(g, h, "relu", gb, backend=bk))
                          for bk in sorted(backends, key=lambda name: name != "torch")]
            for impl, fn in sorted(impls, key=lambda p: p[0] != "reference"):  # the reference first
                run_case(args, op, impl, fn, shape=shape, dtype=dtype, bytes=moved)
    return finish()


if __name__ == "__main__":
    sys.exit(main())
