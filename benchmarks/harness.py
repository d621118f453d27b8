"""Shared benchmark harness: timing, peak memory, machine peaks, result records.

Every ``benchmarks/bench_<op>.py`` does ``from harness import parse_args, run_case, finish``
(the script's own directory is on ``sys.path``). ``python benchmarks/harness.py --peaks``
prints (and caches) this machine's measured fp32 GEMM and copy-bandwidth peaks.
"""
from __future__ import annotations

import argparse
import ctypes
import datetime as _dt
import gc
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path

import torch

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"
# Appended, not prepended: an installed fimoda_kernels (with its built _C) wins over the bare source tree.
if str(REPO_ROOT) not in sys.path:
    sys.path.append(str(REPO_ROOT))

# Timing budgets per (case, impl). --quick is the CI smoke / README job: a few samples, small cases.
FULL = dict(warmup=0.1, min_time=0.5, max_time=10.0, min_repeat=5, max_repeat=1000)
QUICK = dict(warmup=0.01, min_time=0.05, max_time=1.0, min_repeat=3, max_repeat=50)
MAX_CALL_S = {"full": 30.0, "quick": 10.0}  # skip a case whose predicted single call is slower


# ----------------------------------------------------------------------------- timing

def _is_cuda(device) -> bool:
    return torch.device(device).type == "cuda"


def _sync(device) -> None:
    if _is_cuda(device):
        torch.cuda.synchronize(device)


_FLUSH: dict = {}


def _flush_l2(device) -> None:
    """Overwrite a buffer larger than the GPU's L2, so a sample never starts with a warm cache
    (as triton.testing.do_bench does)."""
    dev = torch.device(device)
    if dev not in _FLUSH:
        l2 = getattr(torch.cuda.get_device_properties(dev), "L2_cache_size", 0)
        _FLUSH[dev] = torch.empty(max(256 << 20, 4 * l2) // 4, dtype=torch.int32, device=dev)
    _FLUSH[dev].zero_()


def _cuda_samples(fn, device, n: int) -> list:
    events = []
    for _ in range(n):
        _flush_l2(device)
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        stop.record()
        events.append((start, stop))
    torch.cuda.synchronize(device)  # once: back-to-back launches, no host gap in the samples
    return [s.elapsed_time(e) * 1e-3 for s, e in events]


def _cpu_samples(fn, n: int, inner: int) -> list:
    samples = []
    for _ in range(n):
        t = time.perf_counter()
        for _ in range(inner):
            fn()
        samples.append((time.perf_counter() - t) / inner)
    return samples


def time_fn(fn, *, device="cpu", warmup: float = FULL["warmup"], repeat: int | None = None,
            min_time: float = FULL["min_time"], max_time: float = FULL["max_time"],
            min_repeat: int = FULL["min_repeat"], max_repeat: int = FULL["max_repeat"],
            memory: bool = False) -> dict:
    """Time ``fn()`` (no arguments); return ``dict(median_s, min_s, iqr_s, mean_s, n, inner, cold_s)``
    and, with ``memory=True``, ``peak_mem_bytes`` (see :func:`peak_memory`).

    One cold call (JIT, allocator, lazy init) is excluded; then warm-up calls for ``warmup`` seconds
    (skipped when one call already takes longer). The sample count is adaptive: enough samples to
    fill ``min_time`` (at least ``min_repeat``, at most ``max_repeat``), but never more than
    ``max_time`` seconds of samples (a slow op then gets fewer, down to one; with ``memory=True`` an op
    slower than ``max_time`` is timed by its memory call alone). ``repeat`` fixes the count.
    CPU: ``time.perf_counter``, ``inner`` calls per sample so a sample lasts >= 1 ms.
    CUDA: CUDA events around one call per sample, L2 flushed before each, one synchronize at the end.
    """
    cuda = _is_cuda(device)

    def once() -> float:
        t = time.perf_counter()
        fn()
        _sync(device)
        return time.perf_counter() - t

    _sync(device)
    cold = once()
    mem = slow = None
    if memory:
        t = time.perf_counter()
        mem = peak_memory(fn, device=device)
        slow = time.perf_counter() - t  # an upper bound on one warm call (gc, sampler thread included)
    if repeat is None and slow is not None and slow > max_time:
        samples, n, inner = [slow], 1, 1  # slow op: the warm memory call is the one sample
    else:
        est = once()
        if est < warmup:
            end, ests = time.perf_counter() + warmup, [est]
            while time.perf_counter() < end:
                ests.append(once())
            est = statistics.median(ests)
        inner = 1 if cuda else max(1, math.ceil(1e-3 / max(est, 1e-9)))
        per_sample = est * inner
        if repeat is None:
            n = min(max(math.ceil(min_time / per_sample), min_repeat), max_repeat)
            if n * per_sample > max_time:
                n = max(1, int(max_time / per_sample))
        else:
            n = max(1, int(repeat))
        samples = _cuda_samples(fn, device, n) if cuda else _cpu_samples(fn, n, inner)

    q = statistics.quantiles(samples, n=4) if len(samples) >= 2 else None
    out = dict(median_s=statistics.median(samples), min_s=min(samples), iqr_s=q and q[2] - q[0],
               mean_s=statistics.fmean(samples), n=n, inner=inner, cold_s=cold)
    if memory:
        out["peak_mem_bytes"] = mem
    return out


# ----------------------------------------------------------------------------- memory

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _rss_reader():
    """Return a function giving the current resident set size in bytes, or None off Linux."""
    try:
        fd = os.open("/proc/self/statm", os.O_RDONLY)
    except OSError:
        return None
    return lambda: int(os.pread(fd, 128, 0).split()[1]) * _PAGE


def _malloc_trim() -> None:
    # glibc keeps freed heap pages resident; returning them first keeps a later call that reuses
    # them from looking free (an under-estimate), at least for memory freed before the call.
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def peak_memory(fn, *, device="cpu", interval: float = 1e-3) -> int | None:
    """Peak extra memory (bytes) of one ``fn()`` call, its returned output included.

    CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``, minus the bytes
    allocated before the call (exact, in the caching allocator's 512-byte blocks; cached-but-free
    blocks are not counted).
    CPU: torch's allocator is invisible to tracemalloc and ``ru_maxrss`` only ever grows, so a
    background thread samples the process RSS from /proc/self/statm every ``interval`` s (~1 ms)
    during the call, plus once after it, and reports max − baseline. Resolution: one page (4 KiB)
    in size; a spike shorter than ~1 ms between samples can be missed; the whole process is
    measured (OpenMP thread stacks on a first call included). Returns None where /proc is absent.
    """
    gc.collect()
    if _is_cuda(device):
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        out = fn()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - base
        del out
        return int(peak)

    rss = _rss_reader()
    if rss is None:
        return None
    _malloc_trim()
    base = rss()
    peak = [base]
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], rss())
            stop.wait(interval)

    switch = sys.getswitchinterval()
    sys.setswitchinterval(min(switch, interval / 4))  # let the sampler run even if fn holds the GIL
    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        out = fn()
        peak[0] = max(peak[0], rss())  # catches calls shorter than one sampling interval
    finally:
        stop.set()
        thread.join()
        sys.setswitchinterval(switch)
    del out
    return max(0, peak[0] - base)


def memory_available(device="cpu") -> int:
    """Bytes that can still be allocated: MemAvailable on CPU, free device memory on CUDA."""
    if _is_cuda(device):
        return int(torch.cuda.mem_get_info(torch.device(device))[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 62


# ----------------------------------------------------------------------------- machine

def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith(("model name", "hardware", "cpu model")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def machine_info() -> dict:
    """CPU model, logical cores, torch threads, GPU (if any), library versions; no hostname."""
    try:
        import triton
        triton_version = triton.__version__
    except Exception:  # triton is optional
        triton_version = None
    cuda = torch.cuda.is_available()
    return dict(
        cpu=_cpu_model(), cores=os.cpu_count(), torch_threads=torch.get_num_threads(),
        gpu=torch.cuda.get_device_name(0) if cuda else None,
        gpu_count=torch.cuda.device_count() if cuda else 0,
        cuda=torch.version.cuda, torch=torch.__version__, triton=triton_version,
        python=platform.python_version(), os=f"{platform.system()} {platform.machine()}",
    )


def machine_string(info: dict | None = None, device="cpu") -> str:
    """Machine label, e.g. 'NVIDIA H200 / AMD EPYC 9454 (16 cores, 16 threads)' (GPU only for a CUDA
    device); part of the key that renders and ratios group records by."""
    info = info or machine_info()
    cpu = f"{info['cpu']} ({info['cores']} cores, {info['torch_threads']} threads)"
    return f"{info['gpu']} / {cpu}" if _is_cuda(device) and info.get("gpu") else cpu


def _machine_key(device) -> str:
    info = machine_info()
    raw = info["gpu"] if _is_cuda(device) else f"{info['cpu']}-{info['cores']}c-{info['torch_threads']}t"
    return f"{torch.device(device).type}-" + re.sub(r"[^A-Za-z0-9]+", "-", raw).strip("-").lower()


def git_sha() -> str:
    """Short HEAD sha; $FIMODA_BENCH_SHA overrides (for copies without .git); 'unknown' on failure."""
    if os.environ.get("FIMODA_BENCH_SHA"):
        return os.environ["FIMODA_BENCH_SHA"]
    try:
        r = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT,
                           capture_output=True, text=True, timeout=10)
        return r.stdout.strip() if r.returncode == 0 and r.stdout.strip() else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


# ----------------------------------------------------------------------------- peaks

_PEAKS: dict = {}


def measure_peaks(device="cpu", *, remeasure: bool = False) -> dict:
    """This machine's fp32 GEMM peak (GFLOP/s, best over a few square sizes of torch.matmul at
    'highest' fp32 precision, i.e. no TF32) and copy bandwidth (GB/s, bytes read + written by a
    large ``dst.copy_(src)``; ``write_gbps`` of a ``fill_`` is kept for information only).
    Cached in ``benchmarks/.peaks-<machine key>.json``; ``remeasure`` refreshes it."""
    key = _machine_key(device)
    path = BENCH_DIR / f".peaks-{key}.json"
    if not remeasure:
        if key in _PEAKS:
            return _PEAKS[key]
        if path.exists():
            _PEAKS[key] = json.loads(path.read_text())
            return _PEAKS[key]

    dev = torch.device(device)
    cuda = _is_cuda(dev)
    timing = dict(device=dev, warmup=0.05, min_time=0.3, max_time=3.0, min_repeat=3, max_repeat=100)
    sizes = (4096, 8192) if cuda else (1024, 2048)
    precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        gemm = {}
        for n in sizes:
            a, b = (torch.randn(n, n, device=dev) for _ in range(2))
            gemm[n] = 2 * n ** 3 / time_fn(lambda: torch.matmul(a, b), **timing)["median_s"] / 1e9
            del a, b
    finally:
        torch.set_float32_matmul_precision(precision)
    nbytes = (1 << 30) if cuda else (256 << 20)  # far beyond L2 (GPU) / L3 (CPU)
    src = torch.randn(nbytes // 4, device=dev)
    dst = torch.empty_like(src)
    copy_s = time_fn(lambda: dst.copy_(src), **timing)["median_s"]
    fill_s = time_fn(lambda: dst.fill_(1.0), **timing)["median_s"]  # write-only, for information
    del src, dst
    peaks = dict(gemm_gflops=round(max(gemm.values()), 1), mem_gbps=round(2 * nbytes / copy_s / 1e9, 1),
                 write_gbps=round(nbytes / fill_s / 1e9, 1),
                 gemm_by_size={str(k): round(v, 1) for k, v in gemm.items()}, copy_bytes=nbytes,
                 device=dev.type, machine=machine_string(device=dev), date=_now(),
                 method="fp32 torch.matmul n^3 (best of sizes, no TF32); dst.copy_(src), read+write bytes")
    path.write_text(json.dumps(peaks, indent=1) + "\n")
    _PEAKS[key] = peaks
    return peaks


# ----------------------------------------------------------------------------- records

def fmt_time(s: float | None) -> str:
    if s is None:
        return "–"
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("µs", 1e-6)):
        if s >= scale:
            return f"{s / scale:.3g} {unit}"
    return f"{s / 1e-9:.3g} ns"


def fmt_bytes(b: float | None) -> str:
    if b is None:
        return "–"
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if b >= scale:
            return f"{b / scale:.3g} {unit}"
    return f"{int(b)} B"


def fmt_shape(shape: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in shape.items())


def fmt_rate(rec: dict) -> str:
    """'12.3 GFLOP/s' and/or '45.6 GB/s' of a record."""
    parts = [f"{rec[k]:.4g} {u}" for k, u in (("gflops", "GFLOP/s"), ("gbps", "GB/s")) if rec.get(k) is not None]
    return ", ".join(parts) or "–"


def case_key(rec: dict) -> tuple:
    """What makes two records the same case (impl aside): used for ratios vs 'reference'."""
    return (rec["op"], json.dumps(rec["shape"], sort_keys=True), rec["dtype"], rec["device"], rec["machine"])


_REF_S: dict = {}  # case_key -> reference median of this process, for the speed-up on the printed line


def record(op: str, impl: str, shape: dict, dtype, device, stats: dict, flops: float | None = None,
           bytes: float | None = None, peaks: dict | None = None, extra: dict | None = None,
           out_dir: str | Path | None = None, mode: str = "full") -> dict:
    """Build one result record, print one line, append it as JSON to ``<out_dir>/<op>.jsonl``.

    ``stats`` is :func:`time_fn`'s dict (``peak_mem_bytes`` included when measured). ``flops`` /
    ``bytes``: work of one call; the rate is compared with the GEMM / copy peak of ``peaks``
    (measured or loaded via :func:`measure_peaks` when None); ``frac_peak`` is the larger of the two
    fractions, i.e. against the resource that binds. ``extra``: free-form dict kept as is.
    """
    device = str(torch.device(device))
    peaks = peaks or measure_peaks(device)
    t = stats["median_s"]
    info = machine_info()
    rec = dict(op=op, impl=impl, shape=dict(shape), dtype=str(dtype).replace("torch.", ""), device=device,
               median_s=t, min_s=stats.get("min_s"), iqr_s=stats.get("iqr_s"), n=stats.get("n"),
               flops=flops, bytes=bytes,
               gflops=flops / t / 1e9 if flops else None, gbps=bytes / t / 1e9 if bytes else None,
               peak_mem_bytes=stats.get("peak_mem_bytes"),
               mode=mode, git=git_sha(), date=_now(), machine=machine_string(info, device),
               machine_info=info, peaks=dict(gemm_gflops=peaks["gemm_gflops"], mem_gbps=peaks["mem_gbps"]),
               extra=extra or {})
    fracs = [rec["gflops"] / peaks["gemm_gflops"] if rec["gflops"] else None,
             rec["gbps"] / peaks["mem_gbps"] if rec["gbps"] else None]
    rec["frac_gemm_peak"], rec["frac_mem_peak"] = fracs
    rec["frac_peak"] = max((f for f in fracs if f is not None), default=None)

    key = case_key(rec)
    if impl == "reference":
        _REF_S[key] = t
    speedup = f"{_REF_S[key] / t:6.2f}x ref" if key in _REF_S else " " * 10
    frac = f"{rec['frac_peak']:6.1%} of peak" if rec["frac_peak"] is not None else ""
    print(f"{op} {device} {rec['dtype']} {fmt_shape(shape):<32} {impl:<10} {fmt_time(t):>9} "
          f"±{fmt_time(rec['iqr_s']):<8} {speedup} {fmt_rate(rec):>14} {frac} "
          f"mem {fmt_bytes(rec['peak_mem_bytes'])}", flush=True)

    out_dir = Path(out_dir) if out_dir else RESULTS_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / f"{op}.jsonl", "a") as f:
        f.write(json.dumps(rec, default=str) + "\n")
    return rec


# ----------------------------------------------------------------------------- script plumbing

def parse_args(description: str | None = None, argv=None, add_arguments=None) -> argparse.Namespace:
    """Common CLI: --quick, --device, --out, --impl, --budget, --remeasure.

    ``add_arguments(parser)`` may add op-specific options. The namespace gains ``timing``
    (kwargs for :func:`time_fn`) and ``mode`` ('quick' | 'full').
    """
    p = argparse.ArgumentParser(description=description,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small cases, few repeats (CI smoke)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--out", type=Path, default=None, help=f"results dir (default {RESULTS_DIR})")
    p.add_argument("--impl", default=None, help="comma-separated impls to run (default: all)")
    p.add_argument("--budget", type=float, default=None, help="max seconds of samples per case and impl")
    p.add_argument("--max-call-s", type=float, default=None,
                   help="skip a case predicted (from the same impl's previous case) to take longer per call "
                        f"(default {MAX_CALL_S['full']:g}, quick {MAX_CALL_S['quick']:g})")
    p.add_argument("--remeasure", action="store_true", help="re-measure the machine peaks")
    if add_arguments:
        add_arguments(p)
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: torch sees no CUDA device")
    args.mode = "quick" if args.quick else "full"
    args.timing = dict(QUICK if args.quick else FULL)
    if args.budget is not None:
        args.timing.update(max_time=args.budget, min_time=min(args.timing["min_time"], args.budget))
    args.impl = set(args.impl.split(",")) if args.impl else None
    args.max_call_s = args.max_call_s or MAX_CALL_S[args.mode]
    args.peaks = measure_peaks(args.device, remeasure=args.remeasure)
    return args


_FAILED: list = []
_S_PER_UNIT: dict = {}  # (op, impl, device, dtype) -> seconds per flop (or byte) of its last case


def run_case(args, op: str, impl: str, fn, *, shape: dict, dtype, flops=None, bytes=None,
             rates: dict | None = None, extra: dict | None = None, needs_bytes: int | None = None):
    """Time ``fn`` with peak memory, then :func:`record` it; returns the record, or None if skipped/failed.

    ``rates``: ``{name: count per call}`` stored as ``extra[name + '_per_s']`` (e.g. Philox words/s).
    ``needs_bytes``: skip the case (with a message) when less memory than that is available.
    A case is also skipped when the same impl's previous case, scaled by flops (or bytes), predicts
    one call slower than ``--max-call-s`` (e.g. a pure-torch reference at full size on 2 CPU cores);
    so order each impl's cases from small to large.
    An exception is reported and remembered (see :func:`finish`) instead of ending the script,
    so one broken backend does not lose the others' numbers.
    """
    if args.impl and impl not in args.impl:
        return None
    label = f"{op} {args.device} {fmt_shape(shape)} {impl}"
    if needs_bytes and needs_bytes > memory_available(args.device):
        print(f"SKIP {label}: needs ~{fmt_bytes(needs_bytes)}, "
              f"{fmt_bytes(memory_available(args.device))} available", flush=True)
        return None
    work, speed_key = flops or bytes, (op, impl, args.device, str(dtype))
    if work and speed_key in _S_PER_UNIT and _S_PER_UNIT[speed_key] * work > args.max_call_s:
        print(f"SKIP {label}: predicted {fmt_time(_S_PER_UNIT[speed_key] * work)} per call "
              f"> --max-call-s {args.max_call_s:g}", flush=True)
        return None
    try:
        stats = time_fn(fn, device=args.device, memory=True, **args.timing)
    except Exception as e:  # noqa: BLE001 - reported, counted, and turned into the exit code
        print(f"FAIL {label}: {type(e).__name__}: {e}", flush=True)
        traceback.print_exc()
        _FAILED.append(label)
        return None
    finally:
        if _is_cuda(args.device):
            torch.cuda.empty_cache()
    if work:
        _S_PER_UNIT[speed_key] = stats["median_s"] / work
    extra = dict(extra or {})
    for name, count in (rates or {}).items():
        extra[f"{name}_per_s"] = count / stats["median_s"]
    return record(op, impl, shape, dtype, args.device, stats, flops=flops, bytes=bytes, peaks=args.peaks,
                  extra=extra, out_dir=args.out, mode=args.mode)


def finish() -> int:
    """Exit status for a bench script: 1 if any case failed (listed), else 0."""
    if _FAILED:
        print(f"{len(_FAILED)} case(s) failed:\n  " + "\n  ".join(_FAILED), file=sys.stderr)
    return 1 if _FAILED else 0


def _main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Machine info and measured peaks.")
    p.add_argument("--peaks", action="store_true", help="print the measured peaks (cached)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--remeasure", action="store_true")
    args = p.parse_args(argv)
    print(json.dumps(machine_info(), indent=1))
    if args.peaks or args.remeasure:
        print(json.dumps(measure_peaks(args.device, remeasure=args.remeasure), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(_main())
