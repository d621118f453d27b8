"""Loads the native module ``fimoda_kernels._C`` and the build metadata, remembering why not."""
from __future__ import annotations

import json
from pathlib import Path

try:
    from . import _C  # type: ignore[attr-defined]
    C_ERROR = None
except ImportError as exc:  # not built (e.g. a source checkout without `pip install -e .`)
    _C = None
    C_ERROR = f"native module not built or not importable ({exc}); run `pip install -e .`"


def build_info() -> dict:
    """Compiler, flags, CUDA version and architectures of the built module ({} if not built)."""
    if _C is not None:
        return json.loads(_C.build_info)
    path = Path(__file__).with_name("_build_info.json")
    return json.loads(path.read_text()) if path.exists() else {}


def cuda_unavailable_reason() -> str | None:
    """None when the CUDA kernels can run; else why not ("compiled, no device", ...)."""
    if _C is None:
        return C_ERROR
    if not _C.has_cuda:
        return "native module built without CUDA (nvcc not found or FIMODA_CUDA=0)"
    count, why = _C.cuda_device_count()
    if count == 0:
        return f"compiled, no device ({why})"
    import torch

    archs = build_info().get("cuda_architectures") or []
    if archs and torch.cuda.is_available():
        cap = torch.cuda.get_device_capability()
        if not arch_runs(archs, cap):
            return (f"compiled for {', '.join(archs)}, which cannot run on this sm_{cap[0]}{cap[1]} device; "
                    f"rebuild with CMAKE_CUDA_ARCHITECTURES={cap[0]}{cap[1]}")
    return None


def arch_runs(archs, capability: tuple[int, int]) -> bool:
    """Whether a build for ``archs`` (CMake's "80-real" / "90-virtual" / "90", or "8.0+PTX") has code for
    a device of ``capability``: machine code of the same major version and a minor not above the
    device's, or PTX of a version not above it (JIT-compiled)."""
    for entry in archs:
        text = str(entry).strip().lower()
        real = not text.endswith("-virtual")
        virtual = not text.endswith("-real") or text.endswith("+ptx")
        digits = "".join(ch for ch in text.split("-")[0].split("+")[0] if ch.isdigit())
        if len(digits) < 2:
            continue
        major, minor = int(digits[:-1]), int(digits[-1])
        if real and major == capability[0] and minor <= capability[1]:
            return True
        if virtual and (major, minor) <= tuple(capability):
            return True
    return False
