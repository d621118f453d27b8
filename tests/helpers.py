"""Helpers shared by the op tests: fresh non-zero random inputs, relative errors, Triton setup."""
import pytest
import torch

from fimoda_kernels._dispatch import backend_unavailable_reasons

# Triton runs on CUDA tensors when a GPU is there, else on CPU under TRITON_INTERPRET=1.
TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# fp32 kernels vs the fp64 reference: 1e-5 without tensor cores, 5e-4 where tf32 may be used (DESIGN.md)
TRITON_TOL = 5e-4 if TRITON_DEVICE == "cuda" else 1e-5


def randn(*shape, dtype=torch.float32, device="cpu", seed=0, shift=0.1):
    """Gaussian draws (shifted off zero mean) from a seeded generator, made in float64 then cast."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=torch.float64) + shift).to(dtype).to(device)


def rel(out, ref):
    """‖out − ref‖ / ‖ref‖ in float64 on the CPU."""
    return float((out.double().cpu() - ref.cpu()).norm() / ref.cpu().norm())


def triton_module(name: str):
    """fimoda_kernels.triton.<name>, or skip the test where Triton cannot run."""
    reasons = backend_unavailable_reasons("triton", TRITON_DEVICE)
    if reasons:
        pytest.skip(f"triton unavailable: {'; '.join(reasons)}")
    import importlib

    return importlib.import_module(f"fimoda_kernels.triton.{name}")


class Reordering(torch.nn.Module):
    """Sorts the batch by its first feature before its first Linear and undoes it after (as packing
    by length does): that layer's rows are not the samples in order."""

    def __init__(self, d_in):
        super().__init__()
        self.fc, self.head = torch.nn.Linear(d_in, 5), torch.nn.Linear(5, 1)

    def forward(self, x):
        order = x[:, 0].argsort()
        return self.head(torch.tanh(self.fc(x[order]))[order.argsort()]).squeeze(-1)
