"""ensemble_step vs torch.optim applied model by model (fresh random parameters, gradients and state;
odd block sizes; models at different steps, some inactive), on every backend."""
import pytest
import torch
from helpers import randn, rel

from fimoda_kernels.ops.ensemble_step import _ensemble_step_reference, ensemble_step, model_coefficients

SEGMENTS = (7, 1, 33)  # per-model block sizes: a 1-entry bias, sizes not multiples of any tile
CONFIGS = [("sgd", 0.0, 0.0), ("sgd", 0.9, 0.0), ("sgd", 0.8, 0.05), ("adam", 0.0, 0.0), ("adam", 0.0, 0.1),
           ("adamw", 0.0, 0.1)]


def _inputs(M, dtype, device, seed=0):
    P = sum(SEGMENTS)
    p = randn(M * P, dtype=dtype, device=device, seed=seed)
    g = randn(M * P, dtype=dtype, device=device, seed=seed + 1)
    s1 = randn(M * P, dtype=dtype, device=device, seed=seed + 2)
    s2 = randn(M * P, dtype=dtype, device=device, seed=seed + 3).abs()
    return p, g, s1, s2


def _blocks(flat, M, m):
    """Model m's parameter tensors (views) in the block layout."""
    out, off = [], 0
    for n in SEGMENTS:
        out.append(flat[off:off + M * n].view(M, n)[m])
        off += M * n
    return out


def _torch_optim(p, g, s1, s2, step, active, optimizer, lr, momentum, wd, betas, eps):
    """Each active model stepped by torch.optim with its state loaded (the oracle)."""
    M = step.shape[0]
    p, s1, s2 = p.clone(), s1.clone(), s2.clone()
    for m in range(M):
        if not active[m]:
            continue
        params = [t.clone().requires_grad_(True) for t in _blocks(p, M, m)]
        for t, gr in zip(params, _blocks(g, M, m)):
            t.grad = gr.clone()
        t_m = int(step[m])
        if optimizer == "sgd":
            opt = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=wd)
            if momentum and t_m > 1:
                for t, b in zip(params, _blocks(s1, M, m)):
                    opt.state[t]["momentum_buffer"] = b.clone()
        else:
            cls = torch.optim.Adam if optimizer == "adam" else torch.optim.AdamW
            opt = cls(params, lr=lr, weight_decay=wd, betas=betas, eps=eps)
            for t, a, b in zip(params, _blocks(s1, M, m), _blocks(s2, M, m)):
                opt.state[t] = dict(step=torch.tensor(float(t_m - 1)), exp_avg=a.clone(), exp_avg_sq=b.clone())
        opt.step()
        for t, dst in zip(params, _blocks(p, M, m)):
            dst.copy_(t.detach())
        if optimizer != "sgd" or momentum:
            for t, dst in zip(params, _blocks(s1, M, m)):
                dst.copy_(opt.state[t]["momentum_buffer" if optimizer == "sgd" else "exp_avg"])
        if optimizer != "sgd":
            for t, dst in zip(params, _blocks(s2, M, m)):
                dst.copy_(opt.state[t]["exp_avg_sq"])
    return p, s1, s2


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("optimizer,momentum,wd", CONFIGS)
def test_matches_torch_optim(backend_device, dtype, optimizer, momentum, wd):
    backend, device = backend_device
    M = 5
    p, g, s1, s2 = _inputs(M, dtype, device)
    step = torch.tensor([1, 2, 7, 1, 3], device=device)
    active = torch.tensor([True, True, False, True, True], device=device)
    kw = dict(optimizer=optimizer, lr=0.03, momentum=momentum, weight_decay=wd, betas=(0.8, 0.95), eps=1e-6)
    want = _torch_optim(p.cpu().double(), g.cpu().double(), s1.cpu().double(), s2.cpu().double(), step.cpu(),
                        active.cpu(), optimizer, 0.03, momentum, wd, (0.8, 0.95), 1e-6)
    s1_in = s1 if optimizer != "sgd" or momentum else None
    s2_in = s2 if optimizer != "sgd" else None
    sentinel = p.clone()
    ensemble_step(p, g, step, state1=s1_in, state2=s2_in, active=active, segments=SEGMENTS, backend=backend, **kw)
    tol = 1e-12 if dtype == torch.float64 else 2e-6
    assert rel(p, want[0]) < tol
    if s1_in is not None:
        assert rel(s1, want[1]) < tol
    if s2_in is not None:
        assert rel(s2, want[2]) < tol
    # the inactive model is untouched, bit for bit
    assert torch.equal(_blocks(p, M, 2)[0], _blocks(sentinel, M, 2)[0])


@pytest.mark.parametrize("M,segments", [(1, (1,)), (3, (1025,)), (2, (3, 2049, 5)), (5, (4097, 3))])
def test_odd_sizes_match_reference(backend_device, M, segments):
    backend, device = backend_device
    P = sum(segments)
    p = randn(M, P, dtype=torch.float32, device=device, seed=4)
    g, s1 = randn(M, P, device=device, seed=5), randn(M, P, device=device, seed=6)
    s2 = randn(M, P, device=device, seed=7).abs()
    step = torch.arange(1, M + 1, device=device)
    ref = [t.cpu().double() for t in (p, g, s1, s2)]
    from fimoda_kernels.ops.ensemble_step import hyperparameters, model_coefficients
    coef = model_coefficients(step.cpu(), None, "adamw", 0.01, (0.9, 0.999))
    _ensemble_step_reference(ref[0].view(-1), ref[1].view(-1), ref[2].view(-1), ref[3].view(-1), coef, segments,
                             "adamw", hyperparameters("adamw", 0.01, 0.0, 0.02, (0.9, 0.999), 1e-8))
    ensemble_step(p, g, step, optimizer="adamw", lr=0.01, weight_decay=0.02, state1=s1, state2=s2,
                  segments=segments, backend=backend)
    assert rel(p, ref[0]) < 1e-6 and rel(s1, ref[2]) < 1e-6 and rel(s2, ref[3]) < 1e-6


def test_bad_inputs():
    p, g = torch.randn(2, 4), torch.randn(2, 4)
    step = torch.tensor([1, 1])
    with pytest.raises(ValueError, match="lr"):
        ensemble_step(p, g, step, optimizer="sgd", lr=0.0)
    with pytest.raises(ValueError, match="optimizer"):
        ensemble_step(p, g, step, optimizer="rmsprop", lr=0.1)
    with pytest.raises(ValueError, match="state1"):
        ensemble_step(p, g, step, optimizer="sgd", lr=0.1, momentum=0.9)
    with pytest.raises(ValueError, match="params: expected memory separate from grads'"):
        ensemble_step(p, p, step, optimizer="sgd", lr=0.1)
    s1 = torch.zeros_like(p)
    with pytest.raises(ValueError, match="state1: expected memory separate from state2's"):
        ensemble_step(p, g, step, optimizer="adam", lr=0.1, state1=s1, state2=s1)
    from fimoda_kernels.ops.ensemble_step import EnsembleStepper

    stepper = EnsembleStepper("sgd", 0.1, 0.9, 0.0, (0.9, 0.999), 1e-8, segments=(4,), device="cpu")
    with pytest.raises(ValueError, match="state1: expected 8 entries for 'sgd', got None"):  # not a crash
        stepper(p, g, step)
    with pytest.raises(ValueError, match="params, grads: expected 8 entries"):
        stepper(p, g[:1], step, s1, None)
    with pytest.raises(ValueError, match="momentum.*'sgd'.*'adam'"):  # Adam has no momentum: not ignored silently
        ensemble_step(p, g, step, optimizer="adam", lr=0.1, momentum=0.9, state1=p.clone(), state2=p.clone())
    with pytest.raises(ValueError, match="segments"):
        ensemble_step(p, g, step, optimizer="sgd", lr=0.1, segments=(3,))
    with pytest.raises(ValueError, match="step"):
        ensemble_step(p, g, torch.tensor([1, 0]), optimizer="sgd", lr=0.1)
    with pytest.raises(ValueError, match="step"):
        ensemble_step(p, g, torch.tensor([1, 1, 1]), optimizer="sgd", lr=0.1)
    with pytest.raises(TypeError, match="grads"):
        ensemble_step(p, g.double(), step, optimizer="sgd", lr=0.1)
    with pytest.raises(ValueError, match="betas"):
        ensemble_step(p, g, step, optimizer="adam", lr=0.1, betas=(0.9, 1.0), state1=p.clone(), state2=p.clone())


def test_adam_step_size_is_torch_optims_float_division():
    """lr / (1 − β1^t) as torch.optim computes it with Python floats (a tensor ``lr / x`` multiplies by
    the reciprocal: 1 ulp off at 64 of the first 200 steps)."""
    lr, betas = 0.003, (0.9, 0.999)
    t = torch.arange(1, 201)
    coef = model_coefficients(t, None, "adam", lr, betas)
    assert coef[:, 1].tolist() == [lr / (1 - betas[0] ** s) for s in range(1, 201)]
    assert coef[:, 2].tolist() == [(1 - betas[1] ** s) ** 0.5 for s in range(1, 201)]


def test_adam_corrections_without_a_table_take_the_distinct_steps():
    """The public op (no step table) computes the corrections of the distinct step numbers only (it
    tabulated every step up to the largest, O(step) per call), equal to the tabulated values."""
    lr, betas = 0.01, (0.8, 0.99)
    step = torch.tensor([1_000_000, 3, 1_000_000, 0])
    coef = model_coefficients(step, None, "adam", lr, betas)
    table = {t: (lr / (1 - betas[0] ** t), (1 - betas[1] ** t) ** 0.5) if t else (0.0, 0.0) for t in (0, 3, 10**6)}
    assert coef[:, 1:].tolist() == [list(table[t]) for t in step.tolist()]
