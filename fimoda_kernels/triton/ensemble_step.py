"""One optimizer step for M models at once in Triton (layout and formulas:
fimoda_kernels/ops/ensemble_step.py). Grid (programs striding over (model, entry tile) pairs, parameter
blocks); the hyperparameters come in a small tensor of the parameters' dtype (Triton passes Python
floats as float32, which would round float64 runs), the per-model (active, a, b) table in float64."""
import torch
import triton
import triton.language as tl


@triton.jit  # "params_ptr", not "params": Triton 3.6's generated argument binder shadows that name
def _ensemble_step_kernel(params_ptr, grads, s1, s2, coef, segments, hyper, M,
                          OPT: tl.constexpr, MOMENTUM: tl.constexpr, DECAY: tl.constexpr, BLOCK: tl.constexpr):
    j = tl.program_id(1)
    base = tl.zeros((), dtype=tl.int64)
    for k in range(0, j):
        base += M * tl.load(segments + k)
    n = tl.load(segments + j)
    tiles = (n + BLOCK - 1) // BLOCK
    DT = params_ptr.dtype.element_ty
    neg_lr = tl.load(hyper + 0)
    mom = tl.load(hyper + 1)
    wd = tl.load(hyper + 2)
    one_m_b1 = tl.load(hyper + 3)
    b2 = tl.load(hyper + 4)
    one_m_b2 = tl.load(hyper + 5)
    eps = tl.load(hyper + 6)
    decay = tl.load(hyper + 7)
    # each program strides over this block's (model, tile) pairs: a grid of (tiles, models, blocks)
    # would launch mostly empty programs (a bias is one tile of a weight's many)
    for t in range(tl.program_id(0).to(tl.int64), M * tiles, tl.num_programs(0).to(tl.int64)):
        m = t // tiles
        active = tl.load(coef + 3 * m)
        a = tl.load(coef + 3 * m + 1)
        b = tl.load(coef + 3 * m + 2)
        e = (t - m * tiles) * BLOCK + tl.arange(0, BLOCK)
        mask = e < tl.where(active != 0.0, n, 0)  # an inactive model: every entry masked
        i = base + m * n + e
        d = tl.load(grads + i, mask=mask, other=0.0)
        q = tl.load(params_ptr + i, mask=mask, other=0.0)
        if OPT == 0:
            if DECAY:
                d = d + wd * q
            if MOMENTUM:
                buf = tl.load(s1 + i, mask=mask, other=0.0)
                d = tl.where(a != 0.0, d, buf * mom + d)
                tl.store(s1 + i, d, mask=mask)
            tl.store(params_ptr + i, q + neg_lr * d, mask=mask)
        else:
            if OPT == 2:
                q = q * decay
            elif DECAY:
                d = d + wd * q
            m0 = tl.load(s1 + i, mask=mask, other=0.0)
            v0 = tl.load(s2 + i, mask=mask, other=0.0)
            m1 = m0 + one_m_b1 * (d - m0)
            v = v0 * b2 + one_m_b2 * (d * d)
            denom = tl.sqrt(v) / b.to(DT) + eps
            tl.store(s1 + i, m1, mask=mask)
            tl.store(s2 + i, v, mask=mask)
            tl.store(params_ptr + i, q + ((-a).to(DT) * m1) / denom, mask=mask)


def ensemble_step(params, grads, state1, state2, coef, seg, hyper, max_segment: int, optimizer: int, *,
                  momentum: bool, decay: bool) -> None:
    """In place on the flat contiguous ``params`` (see ops/ensemble_step.py for the arguments); ``seg``
    int64 segment sizes and ``hyper`` the hyperparameters as device tensors, ``max_segment`` the largest
    segment."""
    M = coef.shape[0]
    if M == 0:
        return
    interpret = params.device.type == "cpu"
    block = 1024 if interpret else 512  # the interpreter pays per program: few, large blocks
    block = min(block, triton.next_power_of_2(max_segment))
    programs = 8 if interpret else 4096  # per parameter block; each loops over its (model, tile) pairs
    grid = (min(M * triton.cdiv(max_segment, block), programs), seg.numel())
    if grid[1] > 65535:
        raise ValueError(f"triton ensemble_step: at most 65535 parameter blocks, got {seg.numel()}")
    s1 = state1 if state1 is not None else params  # never read when unused (constexpr flags)
    s2 = state2 if state2 is not None else params
    _ensemble_step_kernel[grid](params, grads, s1, s2, coef, seg, hyper, M, OPT=optimizer,
                                MOMENTUM=momentum, DECAY=decay, BLOCK=block)
