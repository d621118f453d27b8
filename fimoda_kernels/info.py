"""`python -m fimoda_kernels.info`: the build, and which backend can run each op here and why not."""
from __future__ import annotations

import platform

import torch

from . import _dispatch
from ._ext import _C, build_info
from ._dispatch import BACKENDS, OPS, backend_unavailable_reasons


def _triton_version() -> str:
    try:
        import triton

        return triton.__version__
    except Exception:
        return "not installed"


def report() -> str:
    from . import __version__

    lines = [f"fimoda_kernels {__version__}  python {platform.python_version()}  torch {torch.__version__}"
             f"  triton {_triton_version()}"]
    info = build_info()
    if info:
        lines.append("build: " + ", ".join(f"{k}={v}" for k, v in info.items()))
    else:
        lines.append("build: no _build_info.json (native module not built)")
    if _C is not None:
        lines.append(f"cpu kernels: OpenMP threads {_C.cpu_num_threads()}, Philox SIMD {_C.cpu_simd()}")
        if _C.has_cuda:
            lines.append(f"cuda runtime (static): {_C.cuda_runtime_version()}")
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() or (_C is not None and _C.has_cuda) else [])
    lines.append("backends:")
    for backend in BACKENDS:
        for dev in devices:
            why = backend_unavailable_reasons(backend, dev)
            if backend == "triton" and dev == "cpu" and not why:
                state = "available (interpreter mode, TRITON_INTERPRET=1: for tests, slow)"
            else:
                state = "available" if not why else "unavailable: " + "; ".join(why)
            if backend in ("cpu",) and dev != "cpu" or backend == "cuda" and dev != "cuda":
                continue
            lines.append(f"  {backend:6s} [{dev}] {state}")
    lines.append("ops (backends usable on cpu" + (" | cuda" if "cuda" in devices else "") + "):")
    for name, op in sorted(OPS.items()):
        usable = " | ".join(",".join(_dispatch.available_backends(name, d)) or "-" for d in devices)
        lines.append(f"  {name:20s} implemented: {','.join(b for b in BACKENDS if b in op.impls):24s} usable: {usable}")
    return "\n".join(lines)


def main() -> None:
    import fimoda_kernels  # noqa: F401  (registers every op)

    print(report())


if __name__ == "__main__":
    main()
