"""Shared test plumbing: backends as parameters, each on the device it runs on here.

The main pytest process runs everything but Triton; a second process with TRITON_INTERPRET=1
runs ``-m triton`` (the interpreter must be on before Triton kernels are defined). Set
FIMODA_REQUIRE_BACKENDS=cpu,triton to make a missing backend an error instead of a skip, so CI
cannot pass by skipping.
"""
import os

import pytest
import torch

from fimoda_kernels._dispatch import backend_unavailable_reasons

_GPU = torch.cuda.is_available()
BACKEND_DEVICES = [
    pytest.param(("cpu", "cpu"), id="cpu"),
    pytest.param(("torch", "cpu"), id="torch"),
    pytest.param(("triton", "cuda" if _GPU else "cpu"), id="triton", marks=pytest.mark.triton),
    pytest.param(("cuda", "cuda"), id="cuda", marks=pytest.mark.cuda),
]


def pytest_configure(config):
    for backend in filter(None, os.environ.get("FIMODA_REQUIRE_BACKENDS", "").split(",")):
        device = "cuda" if backend == "cuda" or (backend == "triton" and _GPU) else "cpu"
        reasons = backend_unavailable_reasons(backend, device)
        if reasons:
            raise pytest.UsageError(f"FIMODA_REQUIRE_BACKENDS names {backend}, unavailable: {reasons}")


def pytest_collection_modifyitems(config, items):
    if not _GPU:
        skip = pytest.mark.skip(reason="needs a CUDA device")
        for item in items:
            if "cuda" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(params=BACKEND_DEVICES)
def backend_device(request):
    """(backend, device) for every backend; skipped with the reason where it cannot run."""
    backend, device = request.param
    reasons = backend_unavailable_reasons(backend, device)
    if reasons:
        pytest.skip(f"{backend} unavailable: {'; '.join(reasons)}")
    return backend, device
