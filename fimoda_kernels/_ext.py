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
    return None
