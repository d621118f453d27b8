"""Tiny float64 models and their explicit GN / Hessian matrices (torch.func.jacrev / hessian over the
flattened parameter vector), the oracle of the HVP and solver tests."""
import torch
from torch import nn
from torch.func import functional_call, hessian, jacrev

from fimoda_kernels import get_task, param_layout


def mlp(widths, act=nn.Tanh, dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    layers = []
    for a, b in zip(widths, widths[1:]):
        layers += [nn.Linear(a, b), act()]
    return nn.Sequential(*layers[:-1]).to(dtype).eval()


def data(n, d_in, task="mse", classes=3, dtype=torch.float64, seed=1, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    x = scale * torch.randn(n, d_in, generator=g, dtype=torch.float64).to(dtype)
    y = (torch.randn(n, generator=g, dtype=torch.float64).to(dtype) if task == "mse"
         else torch.randint(0, classes, (n,), generator=g))
    return x, y


def _flat_fns(model, task):
    task = get_task(task)
    slots = param_layout(model)
    named = dict(model.named_parameters())
    theta = torch.cat([named[s.name].detach().flatten() for s in slots])
    fixed = {n: t.detach() for n, t in list(named.items()) + list(model.named_buffers())
             if n not in {s.name for s in slots}}

    def call(t, x):
        return functional_call(model, ({s.name: t[s.offset:s.offset + s.numel].view(s.shape) for s in slots}, fixed),
                               (x,))

    return task, theta, call


def dense_gn(model, task, x, y, idx=None):
    """G_b = (1/|b|) J_bᵀ diag(φ''_b) J_b, explicitly (p × p)."""
    task, theta, call = _flat_fns(model, task)
    if idx is not None:
        x, y = x[idx], y[idx]
    J = jacrev(lambda t: task.output(call(t, x), y))(theta)
    with torch.no_grad():
        q = task.d2loss(task.output(call(theta, x), y), y)
    return J.T @ (q[:, None] * J) / x.shape[0]


def dense_hessian(model, task, x, y, idx=None):
    """H_b = ∇²_θ mean_{i∈b} ℓ_i, explicitly (p × p)."""
    task, theta, call = _flat_fns(model, task)
    if idx is not None:
        x, y = x[idx], y[idx]
    return hessian(lambda t: task.loss(call(t, x), y).mean())(theta)


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())
