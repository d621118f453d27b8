"""The structure of plain MLPs (an ``nn.Sequential`` of ``nn.Linear`` layers and elementwise
activations), shared by the paths that write such a model's forward and backward out as GEMMs:
the fused further-training engine and the true-Hessian HVP."""
from __future__ import annotations

from torch import nn
from torch.nn.modules.module import _global_forward_hooks, _global_forward_pre_hooks

# Elementwise activations those paths support (Identity is dropped).
ACTIVATIONS = (nn.ReLU, nn.Tanh, nn.Sigmoid, nn.LeakyReLU, nn.SiLU, nn.GELU, nn.Identity)


def mlp_layers(model: nn.Module):
    """[(linear, activation module or None), ...] when ``model`` is an nn.Sequential of Linear layers,
    each followed by at most one supported activation, with every weight and bias a trainable
    parameter of its own layer (no tied weights), no forward hooks and no forward replaced on an
    instance; else a string saying why not."""
    if type(model) is not nn.Sequential:
        return f"the model is a {type(model).__name__}, not an nn.Sequential"
    if model._forward_hooks or model._forward_pre_hooks or _global_forward_hooks or _global_forward_pre_hooks:
        return "the model has forward hooks (the written-out paths would skip them)"
    layers, seen = [], {}
    for k, m in enumerate(model):
        if m._forward_hooks or m._forward_pre_hooks:
            return f"layer {k} has forward hooks (the written-out paths would skip them)"
        if "forward" in m.__dict__ or "forward" in model.__dict__:
            return f"layer {k} or the model has its forward replaced on the instance"
        if type(m) is nn.Linear:
            if not all(isinstance(t, nn.Parameter) for t in (m.weight, m.bias) if t is not None):
                return f"layer {k}'s weight or bias is not a parameter (pruned or reparametrized)"
            if any(not p.requires_grad for p in m.parameters()):
                return f"layer {k} has frozen parameters"
            for t in (m.weight, m.bias):  # one parameter per layer slot: named_parameters() lists a shared one once
                if t is not None and seen.setdefault(id(t), k) != k:
                    return f"layer {k} shares a parameter with layer {seen[id(t)]} (tied weights)"
            layers.append([m, None])
        elif type(m) in ACTIVATIONS:
            if not layers:
                return f"layer {k} ({type(m).__name__}) comes before the first Linear"
            if type(m) is nn.Identity:
                continue
            if layers[-1][1] is not None:
                return "two activations in a row"
            layers[-1][1] = m
        else:
            return f"layer {k} is a {type(m).__name__} (supported: Linear and ReLU/Tanh/Sigmoid/SiLU/GELU/LeakyReLU)"
    if not layers:
        return "the model has no Linear layer"
    return [tuple(l) for l in layers]
