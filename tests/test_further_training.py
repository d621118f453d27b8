"""further_train vs the sequential protocol: one nn.Module copy per run, torch.optim, a DataLoader
over the run's own per-epoch order (MATH.md §2), for both modes, SGD/Adam/AdamW, regression and
classification, both gradient paths; eq. 13/17 by hand; save/load; checkpoint and resume; bad inputs."""
import copy
import logging
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, RandomSampler, Sampler, TensorDataset

from fimoda_kernels import FurtherTrainingResult, further_train
from fimoda_kernels.tasks import MSETask, Task


class EpochOrder(Sampler):
    """The run's order: one torch.randperm(N, generator=g) per epoch, the left-out index deleted."""

    def __init__(self, n, g, drop=None):
        self.n, self.g, self.drop = n, g, drop

    def __iter__(self):
        perm = torch.randperm(self.n, generator=self.g)
        if self.drop is not None:
            perm = perm[perm != self.drop]
        return iter(perm.tolist())

    def __len__(self):
        return self.n - (self.drop is not None)


def sequential(model, train, test, loo, seeds, *, epochs=None, steps=None, eval_every=None, optimizer="sgd",
               lr=0.05, batch_size=4, momentum=0.0, weight_decay=0.0, mode="remove", loss="mse",
               dtype=torch.float64):
    """The paper's protocol, one run at a time. Returns losses [n_evals, n_test, n_loo + 1, n_seeds]."""
    X, Y = train
    Xt, Yt = test
    N = X.shape[0]
    if X.is_floating_point():  # else token ids
        X, Xt = X.to(dtype), Xt.to(dtype)
    if Y.is_floating_point():
        Y, Yt = Y.to(dtype), Yt.to(dtype)
    crit = nn.MSELoss(reduction="none") if loss == "mse" else nn.CrossEntropyLoss(reduction="none")

    def per_sample(out, y):
        if isinstance(loss, Task):
            return loss.loss(out, y)
        return crit(out.reshape(-1), y.reshape(-1)) if loss == "mse" else crit(out, y)

    def test_loss(m):
        m.eval()
        with torch.no_grad():
            return per_sample(m(Xt), Yt)

    rows = []
    for r, seed in enumerate(seeds):
        for j, i in enumerate([None] + list(loo)):
            m = copy.deepcopy(model).to(dtype)
            opt = {"sgd": lambda p: torch.optim.SGD(p, lr=lr, momentum=momentum, weight_decay=weight_decay),
                   "adam": lambda p: torch.optim.Adam(p, lr=lr, weight_decay=weight_decay),
                   "adamw": lambda p: torch.optim.AdamW(p, lr=lr, weight_decay=weight_decay)}[optimizer](m.parameters())
            g = torch.Generator().manual_seed(seed)
            drop = i if mode == "remove" else None
            loader = DataLoader(TensorDataset(X, Y), batch_size=batch_size, sampler=EpochOrder(N, g, drop))
            evals, t = [test_loss(m)], 0
            for _ in range(epochs if epochs is not None else 10**9):
                m.train()
                for xb, yb in loader:
                    lb = per_sample(m(xb), yb).mean()
                    if mode == "downweight" and i is not None:
                        lb = lb - per_sample(m(X[i:i + 1]), Y[i:i + 1])[0] / N
                    opt.zero_grad()
                    lb.backward()
                    opt.step()
                    t += 1
                    if steps is not None and (t % eval_every == 0 or t == steps):
                        evals.append(test_loss(m))
                        m.train()
                    if t == steps:
                        break
                if epochs is not None:
                    evals.append(test_loss(m))
                if t == steps:
                    break
            rows.append(torch.stack(evals))
    L = torch.stack(rows, -1)  # [n_evals, n_test, runs]
    return L.reshape(L.shape[0], L.shape[1], len(seeds), len(loo) + 1).transpose(2, 3)


def data(task="mse", n=23, n_test=7, d=5, classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    X, Xt = torch.randn(n, d, generator=g), torch.randn(n_test, d, generator=g)
    if task == "mse":
        Y, Yt = torch.randn(n, generator=g), torch.randn(n_test, generator=g)
    else:
        Y, Yt = torch.randint(0, classes, (n,), generator=g), torch.randint(0, classes, (n_test,), generator=g)
    return (X, Y), (Xt, Yt)


def mlp(d=5, out=1, act=nn.Tanh, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d, 16), act(), nn.Linear(16, 12), act(), nn.Linear(12, out))


class Residual(nn.Module):
    """Not an nn.Sequential MLP: takes the generic path."""

    def __init__(self, d=5, out=1):
        super().__init__()
        torch.manual_seed(1)
        self.inp, self.norm, self.head = nn.Linear(d, 8), nn.LayerNorm(8), nn.Linear(8, out)

    def forward(self, x):
        h = self.inp(x)
        return self.head(torch.tanh(self.norm(h)) + h)


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


OPTIMIZERS = [dict(optimizer="sgd"), dict(optimizer="sgd", momentum=0.9, weight_decay=0.01),
              dict(optimizer="adam", weight_decay=0.01), dict(optimizer="adamw", weight_decay=0.1)]


def test_random_sampler_draws_two_permutations_per_epoch():
    """Why the reference uses its own sampler: RandomSampler(generator=g) uses draw 2e for epoch e
    (the second randperm of each epoch feeds an empty tail), not one randperm per epoch."""
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    sampler = RandomSampler(range(10), generator=g1)
    epochs = [list(sampler) for _ in range(2)]
    draws = [torch.randperm(10, generator=g2).tolist() for _ in range(4)]
    assert epochs[0] == draws[0]
    if epochs[1] != draws[1]:
        assert epochs[1] == draws[2]
    g = torch.Generator().manual_seed(3)
    order = [list(EpochOrder(10, g)) for _ in range(2)]
    assert order == draws[:2]


@pytest.mark.parametrize("mode", ["remove", "downweight"])
@pytest.mark.parametrize("opt", OPTIMIZERS, ids=lambda o: "-".join(f"{v}" for v in o.values()))
@pytest.mark.parametrize("task", ["mse", "cross_entropy"])
def test_equals_sequential_float64(mode, opt, task):
    train, test = data(task)
    model = mlp(out=1 if task == "mse" else 3, act=nn.ReLU if task == "mse" else nn.Tanh)
    kw = dict(epochs=2, lr=0.05, batch_size=5, mode=mode, loss=task, **opt)
    ref = sequential(model, train, test, [3, 0, 22], [1, 5], **kw)
    for path in ("fused", "generic"):
        res = further_train(model, train, test, [3, 0, 22], [1, 5], dtype=torch.float64, path=path,
                            progress=False, **kw)
        assert res.losses.shape == (3, 7, 4, 2) and res.eval_points == [0, 1, 2]
        assert rel(res.losses, ref) < 1e-10, path
        assert res.config["path"] == path


@pytest.mark.parametrize("mode", ["remove", "downweight"])
@pytest.mark.parametrize("opt", [OPTIMIZERS[1], OPTIMIZERS[2]], ids=["sgd-momentum", "adam"])
def test_equals_sequential_float32(mode, opt):
    train, test = data("mse", n=40)
    model = mlp(act=nn.GELU)
    kw = dict(epochs=2, lr=0.02, batch_size=8, mode=mode, **opt)
    ref = sequential(model, train, test, [7, 39], [2], dtype=torch.float32, **kw)
    for path in ("fused", "generic"):
        res = further_train(model, train, test, [7, 39], [2], path=path, progress=False, **kw)
        assert res.losses.dtype == torch.float64  # evaluated in float64
        assert rel(res.losses, ref) < 1e-5


@pytest.mark.parametrize("epilogues", ["cpu", "torch"])
@pytest.mark.parametrize("act", [nn.ReLU, lambda: nn.LeakyReLU(0.1), lambda: nn.LeakyReLU(-0.3), nn.Sigmoid],
                         ids=["relu", "leaky", "leaky_negative", "sigmoid"])
def test_fused_epilogues_equal_sequential(monkeypatch, epilogues, act):
    """The fused MLP with ops.bias_act's one-pass epilogues and the one-output layer folded in ("cpu",
    the CPU default), and without them (what GPUs run): both equal the sequential protocol."""
    import fimoda_kernels.further_training as ft

    monkeypatch.setattr(ft, "epilogue_backend", lambda x: epilogues)
    train, test = data("mse")
    model = mlp(act=act)
    kw = dict(epochs=2, lr=0.05, batch_size=5, optimizer="sgd", momentum=0.9)
    ref = sequential(model, train, test, [3, 0, 22], [1, 5], **kw)
    res = further_train(model, train, test, [3, 0, 22], [1, 5], dtype=torch.float64, path="fused",
                        progress=False, **kw)
    assert rel(res.losses, ref) < 1e-10


@pytest.mark.parametrize("shape", ["final_tanh", "final_sigmoid_ce", "single_linear_relu"])
def test_fused_activation_after_the_last_linear(shape):
    """An activation after the last Linear is part of the model's output: the fused backward applies
    its derivative before the last layer's gradients."""
    torch.manual_seed(3)
    task = "cross_entropy" if shape.endswith("_ce") else "mse"
    model = {"final_tanh": lambda: nn.Sequential(nn.Linear(5, 16), nn.ReLU(), nn.Linear(16, 1), nn.Tanh()),
             "final_sigmoid_ce": lambda: nn.Sequential(nn.Linear(5, 16), nn.ReLU(), nn.Linear(16, 3), nn.Sigmoid()),
             "single_linear_relu": lambda: nn.Sequential(nn.Linear(5, 1), nn.ReLU())}[shape]()
    train, test = data(task)
    kw = dict(epochs=2, lr=0.05, batch_size=5, loss=task)
    ref = sequential(model, train, test, [3, 0], [1], **kw)
    res = further_train(model, train, test, [3, 0], [1], dtype=torch.float64, path="fused", progress=False, **kw)
    assert rel(res.losses, ref) < 1e-10


def test_fused_engine_folds_a_one_output_head_only_where_it_applies():
    import fimoda_kernels.further_training as ft
    from fimoda_kernels._mlp import mlp_layers

    def engine(model):
        layers = [(lin, ft._activation(a) if a is not None else None) for lin, a in mlp_layers(model)]
        flat = ft._FlatParams(list(model.named_parameters()), 3, torch.float64, torch.device("cpu"))
        return ft._FusedMLP(layers, flat, 4, {id(p): k for k, (_, p) in enumerate(model.named_parameters())})

    assert engine(mlp(act=nn.ReLU)).head  # relu hidden layer, one output
    assert engine(mlp(act=nn.Tanh)).head  # backward-only epilogue
    assert not engine(mlp(act=nn.GELU)).head  # no epilogue for GELU
    assert not engine(mlp(out=3, act=nn.ReLU)).head
    assert not engine(nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 1), nn.Tanh())).head


@pytest.mark.parametrize("mode", ["remove", "downweight"])
def test_steps_and_uneven_batches(mode):
    """N = 21, B = 5: the full run has 5 batches per epoch (the last of 1 point), a remove run 4, so
    epochs end at different steps; evaluation every 3 steps and after the last."""
    train, test = data("mse", n=21)
    model = mlp(act=nn.Sigmoid)
    for kw in (dict(epochs=3), dict(steps=11, eval_every=3)):
        kw.update(optimizer="adam", lr=0.01, batch_size=5, mode=mode)
        ref = sequential(model, train, test, [4, 20], [0, 9], **kw)
        res = further_train(model, train, test, [4, 20], [0, 9], dtype=torch.float64, progress=False, **kw)
        if "steps" in kw:
            assert res.eval_points == [0, 3, 6, 9, 11] and res.eval_unit == "step"
        assert rel(res.losses, ref) < 1e-10


def test_generic_path_for_other_modules():
    train, test = data("mse")
    model = Residual()
    kw = dict(epochs=2, optimizer="sgd", momentum=0.5, lr=0.05, batch_size=6)
    for mode in ("remove", "downweight"):
        ref = sequential(model, train, test, [1, 2], [4], mode=mode, **kw)
        res = further_train(model, train, test, [1, 2], [4], mode=mode, dtype=torch.float64, progress=False, **kw)
        assert res.config["path"] == "generic"
        assert rel(res.losses, ref) < 1e-10


def test_task_object_and_column_targets():
    """A Task instance is accepted and [N, 1] regression targets equal [N] ones."""
    (X, Y), (Xt, Yt) = data("mse")
    model = mlp()
    kw = dict(epochs=1, lr=0.05, batch_size=4, dtype=torch.float64, progress=False)
    a = further_train(model, (X, Y), (Xt, Yt), [0], [0], loss=MSETask(), **kw)
    b = further_train(model, (X, Y[:, None]), (Xt, Yt[:, None]), [0], [0], loss="mse", **kw)
    assert torch.equal(a.losses, b.losses)


def test_model_untouched_and_t0_is_the_given_model():
    train, test = data("mse")
    model = mlp()
    before = copy.deepcopy(model.state_dict())
    res = further_train(model, train, test, [0, 1], [0, 1], epochs=1, lr=0.1, batch_size=4,
                        dtype=torch.float64, progress=False)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    with torch.no_grad():
        want = (model.double()(test[0].double()).squeeze(1) - test[1].double()) ** 2
    assert torch.allclose(res.losses[0], want[:, None, None].expand(-1, 3, 2), rtol=1e-14, atol=0)


def test_gold_by_hand():
    g = torch.Generator().manual_seed(0)
    L = torch.rand(2, 3, 4, 3, generator=g, dtype=torch.float64)  # evals, tests, 1 + 3 loo, 3 seeds
    res = FurtherTrainingResult(L, [0, 1], "epoch", [5, 6, 7], [10, 11, 12], {})
    mean13 = torch.empty(2, 3, 3, dtype=torch.float64)
    full17 = torch.empty(2, 3, 3, dtype=torch.float64)
    sub = torch.empty(2, 3, 3, dtype=torch.float64)
    for t in range(2):
        for z in range(3):
            for i in range(3):
                d13 = [L[t, z, 1 + i, r] - sum(L[t, z, 1 + j, r] for j in range(3)) / 3 for r in range(3)]
                d17 = [L[t, z, 1 + i, r] - L[t, z, 0, r] for r in range(3)]
                mean13[t, z, i], full17[t, z, i] = sum(d13) / 3, sum(d17) / 3
                sub[t, z, i] = (d13[0] + d13[2]) / 2
    assert torch.allclose(res.gold(), mean13, rtol=1e-12, atol=1e-15)
    assert torch.allclose(res.gold("full"), full17, rtol=1e-12, atol=1e-15)
    assert torch.allclose(res.gold(seeds=[10, 12]), sub, rtol=1e-12, atol=1e-15)
    # eq. 13 is eq. 17 with its mean over the LOO runs subtracted
    assert torch.allclose(res.gold("mean"), full17 - full17.mean(-1, keepdim=True), atol=1e-14)
    with pytest.raises(ValueError, match="seeds"):
        res.gold(seeds=[3])
    with pytest.raises(ValueError, match="adjust"):
        res.gold("median")


def test_save_load(tmp_path):
    train, test = data("mse")
    res = further_train(mlp(), train, test, [2], [0], epochs=1, lr=0.1, batch_size=4, progress=False)
    res.save(tmp_path / "r.pt")
    back = FurtherTrainingResult.load(tmp_path / "r.pt")
    assert torch.equal(back.losses, res.losses) and back.eval_points == res.eval_points
    assert back.config == res.config and back.seeds == res.seeds and back.loo_indices == res.loo_indices
    assert back.config["lr"] == 0.1 and back.config["optimizer"] == "sgd"


@pytest.mark.parametrize("path", ["fused", "generic"])
def test_resume_after_interruption(tmp_path, path):
    train, test = data("mse")
    model = mlp()
    kw = dict(epochs=2, optimizer="adam", lr=0.01, batch_size=4, models_per_chunk=3, path=path)
    full = further_train(model, train, test, [0, 3, 5, 7], [1, 2], progress=False, **kw)  # 10 runs, 4 chunks
    calls = []

    def stop_after_two(info):
        calls.append(info)
        if len(calls) == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        further_train(model, train, test, [0, 3, 5, 7], [1, 2], checkpoint_dir=tmp_path, progress=stop_after_two, **kw)
    assert calls[-1]["done"] == 6 and calls[-1]["chunks"] == 4
    seen = []
    res = further_train(model, train, test, [0, 3, 5, 7], [1, 2], checkpoint_dir=tmp_path, progress=seen.append, **kw)
    assert [c["chunk"] for c in seen] == [2, 3]  # the first two chunks were not trained again
    assert torch.equal(res.losses, full.losses)
    with pytest.raises(ValueError, match="different arguments.*lr"):
        further_train(model, train, test, [0, 3, 5, 7], [1, 2], checkpoint_dir=tmp_path, progress=False,
                      **{**kw, "lr": 0.02})


def test_resume_with_another_chunking(tmp_path):
    """A run resumed with another max_memory / models_per_chunk continues (a model's result does not
    depend on its chunk) and equals the uninterrupted run."""
    train, test = data("mse")
    model = mlp()
    kw = dict(epochs=2, lr=0.05, batch_size=4, dtype=torch.float64)
    full = further_train(model, train, test, [0, 3, 5], [1, 2], progress=False, **kw)

    def stop(info):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        further_train(model, train, test, [0, 3, 5], [1, 2], checkpoint_dir=tmp_path, models_per_chunk=2,
                      progress=stop, **kw)
    seen = []
    res = further_train(model, train, test, [0, 3, 5], [1, 2], checkpoint_dir=tmp_path, models_per_chunk=3,
                        progress=seen.append, **kw)
    assert seen[-1]["done"] == 8 and torch.equal(res.losses, full.losses)


class _Quartic(MSETask):
    def loss(self, model_out, targets):
        return (model_out.reshape(-1) - targets.reshape(-1)) ** 4


class _Power(MSETask):
    def __init__(self, power):
        self.power = power

    def loss(self, model_out, targets):
        return (model_out.reshape(-1) - targets.reshape(-1)).abs() ** self.power


def test_checkpoint_fingerprint_covers_architecture_and_loss(tmp_path):
    """Same parameter values, another activation; or another custom loss: never resumed from the
    checkpoint of the other run (its losses would come back untrained)."""
    train, test = data("mse")
    kw = dict(epochs=1, lr=0.01, batch_size=4, progress=False)
    further_train(mlp(act=nn.Tanh), train, test, [0], [1], checkpoint_dir=tmp_path / "a", **kw)
    with pytest.raises(ValueError, match="different arguments.*model"):
        further_train(mlp(act=nn.ReLU), train, test, [0], [1], checkpoint_dir=tmp_path / "a", **kw)
    further_train(mlp(), train, test, [0], [1], checkpoint_dir=tmp_path / "b", loss=_Quartic(), **kw)
    with pytest.raises(ValueError, match="different arguments.*loss"):
        further_train(mlp(), train, test, [0], [1], checkpoint_dir=tmp_path / "b", loss=_Power(4), **kw)
    further_train(mlp(), train, test, [0], [1], checkpoint_dir=tmp_path / "c", loss=_Power(3), **kw)
    with pytest.raises(ValueError, match="different arguments.*loss"):
        further_train(mlp(), train, test, [0], [1], checkpoint_dir=tmp_path / "c", loss=_Power(4), **kw)
    with pytest.raises(ValueError, match="is a further_train checkpoint, not a saved result"):
        FurtherTrainingResult.load(tmp_path / "c" / "further_training.pt")
    # a frozen layer's values are part of the model too
    frozen = mlp()
    frozen[0].requires_grad_(False)
    other = copy.deepcopy(frozen)
    with torch.no_grad():
        other[0].weight.add_(0.1)
    further_train(frozen, train, test, [0], [1], checkpoint_dir=tmp_path / "d", **kw)
    with pytest.raises(ValueError, match="different arguments.*data_sha256"):
        further_train(other, train, test, [0], [1], checkpoint_dir=tmp_path / "d", **kw)
    # a custom Task's tensor settings by value (their repr shows 4 digits)
    further_train(mlp(), train, test, [0], [1], checkpoint_dir=tmp_path / "e", loss=_Power(torch.tensor([2.12341])),
                  **kw)
    with pytest.raises(ValueError, match="different arguments.*loss"):
        further_train(mlp(), train, test, [0], [1], checkpoint_dir=tmp_path / "e",
                      loss=_Power(torch.tensor([2.12344])), **kw)


class _Activated(nn.Module):
    """One class whose forward() differs between two definitions (same repr, same parameters)."""

    def __init__(self, act):
        super().__init__()
        torch.manual_seed(0)
        self.inp, self.head = nn.Linear(5, 6), nn.Linear(6, 1)
        self.act = act

    def forward(self, x):
        return self.head(self.act(self.inp(x)))


class _Closure(MSETask):
    """A loss held as a closure: two closures of one factory share a qualified name."""

    def __init__(self, power):
        self.fn = (lambda d: d.abs() ** power)

    def loss(self, model_out, targets):
        return self.fn(model_out.reshape(-1) - targets.reshape(-1))


class _Held(MSETask):
    """A squared error scaled by a held value's first entry (or 1 when it holds another object)."""

    def __init__(self, value):
        self.value = value

    def loss(self, model_out, targets):
        w = float(self.value[0]) if isinstance(self.value, np.ndarray) else 1.0
        return w * (model_out.reshape(-1) - targets.reshape(-1)) ** 2


def test_checkpoint_fingerprint_covers_code(tmp_path):
    """A changed forward() (same class name, repr and parameters) or a loss closing over another value
    is another study: never resumed. SGD ignores betas and eps, so they do not block a resume."""
    train, test = data("mse")
    kw = dict(epochs=1, lr=0.01, batch_size=4, progress=False)

    def model_with(body):
        cls = type("_Activated", (_Activated,), {"forward": body, "__module__": __name__})
        return cls(None)

    further_train(model_with(lambda self, x: self.head(torch.tanh(self.inp(x)))), train, test, [0], [1],
                  checkpoint_dir=tmp_path / "a", **kw)
    with pytest.raises(ValueError, match="different arguments.*model_code"):
        further_train(model_with(lambda self, x: self.head(torch.sin(self.inp(x)))), train, test, [0], [1],
                      checkpoint_dir=tmp_path / "a", **kw)
    further_train(mlp(), train, test, [0], [1], checkpoint_dir=tmp_path / "b", loss=_Closure(2), **kw)
    with pytest.raises(ValueError, match="different arguments.*loss"):
        further_train(mlp(), train, test, [0], [1], checkpoint_dir=tmp_path / "b", loss=_Closure(4), **kw)
    further_train(mlp(), train, test, [0], [1], checkpoint_dir=tmp_path / "b", loss=_Closure(2), **kw)  # resumes
    # values without a __dict__ (a numpy array) count; a logger's process-dependent caches do not
    further_train(mlp(), train, test, [0], [1], checkpoint_dir=tmp_path / "d", loss=_Held(np.array([1.0])), **kw)
    with pytest.raises(ValueError, match="different arguments.*loss"):
        further_train(mlp(), train, test, [0], [1], checkpoint_dir=tmp_path / "d", loss=_Held(np.array([9.0])), **kw)
    task = _Held(logging.getLogger("fimoda-test"))
    further_train(mlp(), train, test, [0], [1], checkpoint_dir=tmp_path / "e", loss=task, **kw)
    task.value.isEnabledFor(logging.DEBUG)  # fills the logger's cache
    further_train(mlp(), train, test, [0], [1], checkpoint_dir=tmp_path / "e", loss=task, **kw)
    # settings the fingerprint must see (or, for a path's caches, must not): builtins by name, bound
    # methods with their instance, objects nested deep in modules
    from pathlib import Path
    from fimoda_kernels.further_training import _task_id

    def differ(a, b):
        return _task_id(_Held(a)) != _task_id(_Held(b))

    assert differ(torch.tanh, torch.sigmoid) and differ(np.exp, np.log)
    assert differ(nn.HuberLoss(delta=5.0).forward, nn.HuberLoss(delta=0.01).forward)
    assert differ(nn.Sequential(nn.Sequential(nn.HuberLoss(delta=5.0))), nn.Sequential(nn.Sequential(nn.HuberLoss())))
    p = Path("/tmp/weights.pt")
    before = _task_id(_Held(p))
    hash(p), str(p)  # fills the path's caches, one of them the string hash
    assert _task_id(_Held(p)) == before and differ(p, Path("/tmp/other.pt"))
    first = further_train(mlp(), train, test, [0], [1], checkpoint_dir=tmp_path / "c", **kw)
    again = further_train(mlp(), train, test, [0], [1], checkpoint_dir=tmp_path / "c", betas=(0.5, 0.6), eps=1e-3,
                          **kw)
    assert torch.equal(first.losses, again.losses)


def test_bias_registered_before_weight():
    """A Linear whose bias comes first in named_parameters() (weight_norm removed re-registers the
    weight last): the fused engine finds each tensor by identity, not position (it crashed, and a
    1 × 1 layer would have swapped weight and bias)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 1))
    for lin in (model[0], model[2]):
        w = lin.weight
        del lin.weight
        lin.weight = w
    assert [n for n, _ in model.named_parameters()][:2] == ["0.bias", "0.weight"]
    train, test = data("mse")
    kw = dict(epochs=2, lr=0.05, batch_size=5)
    ref = sequential(model, train, test, [3, 0], [1], **kw)
    res = further_train(model, train, test, [3, 0], [1], dtype=torch.float64, path="fused", progress=False, **kw)
    assert rel(res.losses, ref) < 1e-10


def test_tied_linear_takes_the_generic_path():
    """A Linear used twice (one set of parameters) is not a plain MLP: the default path falls back to
    the generic one and matches the sequential protocol."""
    torch.manual_seed(0)
    shared = nn.Linear(8, 8)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), shared, nn.Tanh(), shared, nn.Tanh(), nn.Linear(8, 1))
    train, test = data("mse")
    kw = dict(epochs=2, lr=0.05, batch_size=5)
    ref = sequential(model, train, test, [3, 0], [1], **kw)
    res = further_train(model, train, test, [3, 0], [1], dtype=torch.float64, progress=False, **kw)
    assert res.config["path"] == "generic" and rel(res.losses, ref) < 1e-10


def test_sequence_arguments_and_json_config(tmp_path):
    """numpy arrays, ranges and numpy / tensor scalars are accepted and stored as plain ints."""
    np = pytest.importorskip("numpy")
    train, test = data("mse")
    kw = dict(steps=3, lr=0.05, batch_size=4, progress=False)
    a = further_train(mlp(), train, test, np.array([0, 4]), np.array([1, 2]), eval_every=np.int64(2), **kw)
    b = further_train(mlp(), train, test, range(0, 5, 4), torch.tensor([1, 2]), eval_every=torch.tensor(2), **kw)
    assert torch.equal(a.losses, b.losses) and a.config == b.config and a.config["eval_every"] == 2
    a.save(tmp_path / "r.pt")
    assert FurtherTrainingResult.load(tmp_path / "r.pt").config == a.config
    assert torch.equal(a.gold(seeds=np.array([2])), a.gold(seeds=[2]))
    with pytest.raises(ValueError, match="seeds: expected a non-empty sequence"):
        a.gold(seeds=2)


def test_chunking_does_not_change_results():
    train, test = data("mse")
    model = mlp()
    kw = dict(epochs=2, lr=0.05, batch_size=4, mode="remove", dtype=torch.float64, progress=False)
    a = further_train(model, train, test, [0, 3, 5], [1, 2], models_per_chunk=1, **kw)
    b = further_train(model, train, test, [0, 3, 5], [1, 2], max_memory=10**9, **kw)
    assert rel(a.losses, b.losses) < 1e-13


def test_bad_inputs():
    train, test = data("mse")
    model = mlp()
    kw = dict(epochs=1, lr=0.1, batch_size=4, progress=False)
    cases = [
        (ValueError, "loo_indices.*distinct", dict(loo_indices=[1, 1])),
        (ValueError, r"loo_indices\[1\].*<= 22", dict(loo_indices=[1, 23])),
        (ValueError, "loo_indices", dict(loo_indices=[-1])),
        (ValueError, "loo_indices", dict(loo_indices=[])),
        (ValueError, "seeds", dict(seeds=[])),
        (ValueError, "seeds.*distinct", dict(seeds=[1, 1])),
        (ValueError, "lr", dict(lr=0.0)),
        (ValueError, "lr", dict(lr=-1.0)),
        (ValueError, "epochs, steps", dict(steps=3)),
        (ValueError, "epochs, steps", dict(epochs=None)),
        (ValueError, "eval_every", dict(epochs=None, steps=3)),
        (ValueError, "eval_every", dict(eval_every=2)),
        (ValueError, "mode", dict(mode="drop")),
        (ValueError, "optimizer", dict(optimizer="rmsprop")),
        (ValueError, "momentum", dict(optimizer="adam", momentum=0.9)),
        (ValueError, "batch_size", dict(batch_size=0)),
        (TypeError, "dtype", dict(dtype=torch.float16)),
        (ValueError, "path.*fused", dict(path="fused", model=Residual())),
        (ValueError, "BatchNorm", dict(model=nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4), nn.Linear(4, 1)))),
        (ValueError, "Dropout", dict(model=nn.Sequential(nn.Linear(5, 4), nn.Dropout(0.5), nn.Linear(4, 1)))),
        (ValueError, "test", dict(test=(torch.randn(3, 4), torch.randn(3)))),
        (ValueError, "train", dict(train=(torch.randn(5, 5), torch.randn(4)))),
        (ValueError, "model_out", dict(model=mlp(out=2))),
        (ValueError, r"loss: expected one of", dict(loss="MSE")),
        (ValueError, r"train\[0\] \(inputs\): expected finite", dict(train=(train[0].index_put((torch.tensor([3]),), torch.tensor(float("nan"))), train[1]))),
        (ValueError, r"test\[1\] \(targets\): expected finite", dict(test=(test[0], test[1].index_put((torch.tensor([1]),), torch.tensor(float("inf")))))),
        (ValueError, "test: expected at least one test point", dict(test=(test[0][:0], test[1][:0]))),
        (ValueError, "device: expected a device that computes", dict(device="meta")),
        (ValueError, "checkpoint_dir: expected a directory", dict(checkpoint_dir=__file__)),
        (ValueError, "train: the loss of training sample 3 at the given model is not finite",
         dict(model=nn.Sequential(nn.Linear(5, 1)),
              train=(train[0].index_put((torch.tensor([3]),), torch.tensor(1e30)), train[1]))),
    ]
    for exc, pattern, over in cases:
        args = dict(model=model, train=train, test=test, loo_indices=[0, 1], seeds=[0], **kw)
        args.update(over)
        with pytest.raises(exc, match=pattern):
            further_train(**args)


@pytest.mark.parametrize("where,label", [("train", 3), ("test", -100), ("train", -1)])
def test_class_labels_checked_in_full(where, label):
    """Every label is checked against the model's classes before training (a bad one deep in the set
    would otherwise fail mid-run, or be skipped by cross_entropy's ignore_index=-100)."""
    train, test = data("cross_entropy")
    pair = {"train": train, "test": test}[where]
    y = pair[1].clone()
    y[-1] = label
    args = {"train": train, "test": test, where: (pair[0], y)}
    with pytest.raises(ValueError, match=rf"{where}\[1\] \(targets\): expected class indices in \[0, 3\)"):
        further_train(mlp(out=3), args["train"], args["test"], [0], [0], epochs=1, lr=0.1, batch_size=4,
                      loss="cross_entropy", progress=False)


def test_non_finite_model_is_not_blamed_on_lr():
    train, test = data("mse")
    model = mlp()
    with torch.no_grad():
        model[-1].bias.fill_(float("inf"))
    with pytest.raises(ValueError, match=r"model: 4.bias holds NaN or Inf"):
        further_train(model, train, test, [0], [0], epochs=1, lr=0.1, batch_size=4, progress=False)
    x_te = test[0].clone()
    x_te[2] = 1e30  # finite parameters and training losses, a test loss that overflows
    with pytest.raises(ValueError, match=r"model: the test losses of the given model \(t = 0\)") as info:
        further_train(nn.Sequential(nn.Linear(5, 1)), train, (x_te, test[1]), [0], [0], epochs=1, lr=0.1,
                      batch_size=4, progress=False)
    from fimoda_kernels import FurtherTrainingDivergedError

    assert not isinstance(info.value, FurtherTrainingDivergedError)  # not the learning rate's fault


def test_divergence_is_an_error():
    from fimoda_kernels import FurtherTrainingDivergedError

    train, test = data("mse")
    with pytest.raises(FurtherTrainingDivergedError, match="diverged"):
        further_train(mlp(), train, test, [0], [0], epochs=3, lr=1e6, batch_size=4, progress=False)
    x = train[0].clone()
    x[5, 0] = 1e17  # finite loss and gradient at the start, which no learning rate survives
    with pytest.raises(ValueError, match=r"diverged.*the largest training loss at the given model: .*, sample 5\)"):
        further_train(nn.Sequential(nn.Linear(5, 1)), (x, train[1]), test, [0], [0], epochs=1, lr=1e-12,
                      batch_size=4, progress=False)


@pytest.mark.triton
def test_engine_with_triton_update(monkeypatch):
    """The engine's optimizer update through the Triton kernel (on the GPU where there is one, else
    the interpreter on CPU) gives the cpu result."""
    from helpers import TRITON_DEVICE, triton_module

    triton_module("ensemble_step")
    train, test = data("mse", n=12)
    kw = dict(epochs=1, optimizer="adam", lr=0.01, batch_size=5, dtype=torch.float64, progress=False)
    want = further_train(mlp(), train, test, [0, 11], [3], **kw)
    monkeypatch.setenv("FIMODA_BACKEND", "triton")
    got = further_train(mlp(), train, test, [0, 11], [3], device=TRITON_DEVICE, **kw)
    assert rel(got.losses, want.losses) < 1e-12


_RESUME_SCRIPT = '''
import sys, torch
from torch import nn
from fimoda_kernels import further_train
from fimoda_kernels.tasks import MSETask, Task

class Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = nn.Linear(5, 6), nn.Linear(6, 1)
    def forward(self, x):
        act = torch.tanh if "tanh" in {"tanh", "relu", "gelu"} else torch.relu
        return self.b(act(self.a(x)))

def power_loss(p):
    return lambda d: d.abs() ** p

class Closure(MSETask):
    def __init__(self, p):
        self.fn, self.kinds = power_loss(p), {"x", "y", "z"}
    def loss(self, out, y):
        return self.fn(out.reshape(-1) - y.reshape(-1))

def stop(info):
    if sys.argv[2] == "stop":
        raise KeyboardInterrupt

g = torch.Generator().manual_seed(0)
train = (torch.randn(23, 5, generator=g), torch.randn(23, generator=g))
test = (torch.randn(7, 5, generator=g), torch.randn(7, generator=g))
kw = dict(epochs=2, lr=0.01, batch_size=4, models_per_chunk=2, loss=Closure(2))
try:
    res = further_train(Net(), train, test, [0, 1, 2], [1], checkpoint_dir=sys.argv[1], progress=stop, **kw)
except KeyboardInterrupt:
    sys.exit(3)
torch.save(res.losses, sys.argv[1] + "/losses.pt")
'''


def test_resume_in_new_processes(tmp_path):
    """A run stopped after its first chunk resumes in another Python process (another string-hash
    seed): the fingerprint of its code and custom loss is the same there, and so are the results."""
    import os
    import subprocess
    import sys

    script = tmp_path / "run.py"
    script.write_text(_RESUME_SCRIPT)

    def run(d, how, seed):
        env = dict(os.environ, PYTHONHASHSEED=str(seed))
        return subprocess.run([sys.executable, str(script), str(d), how], env=env, capture_output=True, text=True)

    assert run(tmp_path / "a", "stop", 1).returncode == 3
    done = run(tmp_path / "a", "go", 2)
    assert done.returncode == 0, done.stderr[-2000:]
    fresh = run(tmp_path / "b", "go", 3)
    assert fresh.returncode == 0, fresh.stderr[-2000:]
    assert torch.equal(torch.load(tmp_path / "a" / "losses.pt"), torch.load(tmp_path / "b" / "losses.pt"))


class _Recurrent(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.rnn, self.head = nn.GRU(1, 3, batch_first=True), nn.Linear(3, 1)

    def forward(self, x):  # the 5 features as a sequence of length 5
        return self.head(self.rnn(x[..., None])[0][:, -1]).squeeze(-1)


def test_models_vmap_cannot_batch_train_one_at_a_time():
    """vmap has no batching rule for nn.GRU/LSTM/RNN (a raw torch error before): the generic engine
    trains the chunk's models one by one instead, with a warning, and equals the sequential protocol."""
    from fimoda_kernels import FallbackWarning

    train, test = data("mse", n=11, n_test=3)
    model = _Recurrent().double()
    kw = dict(epochs=2, optimizer="adam", lr=0.01, batch_size=4)
    ref = sequential(model, train, test, [1, 7], [2], **kw)
    with pytest.warns(FallbackWarning, match="vmap cannot batch this model"):
        res = further_train(model, train, test, [1, 7], [2], dtype=torch.float64, progress=False, **kw)
    assert res.config["path"] == "generic" and rel(res.losses, ref) < 1e-10


@pytest.mark.parametrize("path", ["fused", "generic"])
def test_resume_inside_a_chunk(tmp_path, monkeypatch, path):
    """A chunk running longer than _PARTIAL_EVERY_S saves its state at evaluation points (a GPU study
    is one chunk of hours); killed in the middle, the run continues from the last save and equals the
    uninterrupted one, and a resume with another chunking starts that chunk afresh."""
    from fimoda_kernels import further_training as ft

    train, test = data("mse")
    kw = dict(epochs=4, optimizer="adam", lr=0.01, batch_size=4, path=path, progress=False)  # 6 steps per epoch
    full = further_train(mlp(), train, test, [0, 3, 5], [1, 2], **kw)
    monkeypatch.setattr(ft, "_PARTIAL_EVERY_S", 0.0)  # save at every evaluation point
    calls, real = [0], ft.EnsembleStepper.__call__

    def step(self, *args, stop_at=None):
        calls[0] += 1
        if calls[0] == stop_at:
            raise KeyboardInterrupt
        return real(self, *args)

    monkeypatch.setattr(ft.EnsembleStepper, "__call__", lambda self, *a: step(self, *a, stop_at=15))
    with pytest.raises(KeyboardInterrupt):  # in epoch 3, after the saves of epochs 1 and 2
        further_train(mlp(), train, test, [0, 3, 5], [1, 2], checkpoint_dir=tmp_path, **kw)
    assert (tmp_path / ft._PARTIAL_NAME).exists()
    calls[0] = 0
    monkeypatch.setattr(ft.EnsembleStepper, "__call__", lambda self, *a: step(self, *a))
    res = further_train(mlp(), train, test, [0, 3, 5], [1, 2], checkpoint_dir=tmp_path, **kw)
    assert calls[0] == 12  # epochs 3 and 4 only
    assert torch.equal(res.losses, full.losses) and not (tmp_path / ft._PARTIAL_NAME).exists()
    # another chunking: the saved chunk is not this run's first chunk, which starts afresh
    calls[0] = 0
    monkeypatch.setattr(ft.EnsembleStepper, "__call__", lambda self, *a: step(self, *a, stop_at=15))
    other = tmp_path / "other"
    with pytest.raises(KeyboardInterrupt):
        further_train(mlp(), train, test, [0, 3, 5], [1, 2], checkpoint_dir=other, **kw)
    monkeypatch.setattr(ft.EnsembleStepper, "__call__", lambda self, *a: step(self, *a))
    res = further_train(mlp(), train, test, [0, 3, 5], [1, 2], checkpoint_dir=other, models_per_chunk=2, **kw)
    assert torch.equal(res.losses, full.losses)


class _SumOfOutputs(Task):
    """ℓ = (Σ outputs − y)² per sample, for models with [N, T, ...] outputs."""

    def output(self, model_out, targets):
        return model_out.flatten(1).sum(1)

    def phi(self, f, targets):
        return (f - targets) ** 2


def test_fused_path_takes_only_two_dimensional_inputs():
    """An MLP applied to [N, T, d] inputs: the fused engine's buffers are [M, batch, d] (it wrote the
    gathered batch into a resized view, 870× off); such inputs take the generic path."""
    g = torch.Generator().manual_seed(3)
    X, Xt = torch.randn(10, 2, 3, generator=g), torch.randn(3, 2, 3, generator=g)
    Y, Yt = torch.randn(10, generator=g), torch.randn(3, generator=g)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).double()
    kw = dict(epochs=2, lr=0.05, batch_size=4, loss=_SumOfOutputs())
    ref = sequential(model, (X, Y), (Xt, Yt), [0, 9], [1], **kw)
    res = further_train(model, (X, Y), (Xt, Yt), [0, 9], [1], dtype=torch.float64, progress=False, **kw)
    assert res.config["path"] == "generic" and rel(res.losses, ref) < 1e-10
    with pytest.raises(ValueError, match=r"path: 'fused' needs an MLP: .*\[N, features\]"):
        further_train(model, (X, Y), (Xt, Yt), [0], [1], path="fused", progress=False, **kw)


class _Bag(nn.Module):
    """Mean of token embeddings, then a Linear: integer inputs."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(2)
        self.emb, self.head = nn.Embedding(11, 4), nn.Linear(4, 1)

    def forward(self, tokens):
        return self.head(self.emb(tokens).mean(1))


def test_token_id_inputs():
    g = torch.Generator().manual_seed(4)
    X, Xt = torch.randint(0, 11, (12, 5), generator=g), torch.randint(0, 11, (3, 5), generator=g)
    Y, Yt = torch.randn(12, generator=g), torch.randn(3, generator=g)
    model = _Bag().double()
    kw = dict(epochs=2, optimizer="adam", lr=0.01, batch_size=5)
    ref = sequential(model, (X, Y), (Xt, Yt), [2, 5], [0, 1], **kw)
    res = further_train(model, (X, Y), (Xt, Yt), [2, 5], [0, 1], dtype=torch.float64, progress=False, **kw)
    assert res.config["path"] == "generic" and rel(res.losses, ref) < 1e-10


class _Unused(nn.Module):
    """``extra`` reaches the loss only through .detach(), ``spare`` never: torch.optim skips both (no
    gradient), so neither decays."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(5)
        self.lin = nn.Linear(5, 1)
        self.extra = nn.Parameter(torch.randn(1))
        self.spare = nn.Parameter(torch.randn(3))

    def forward(self, x):
        return self.lin(x).squeeze(-1) + self.extra.detach()


@pytest.mark.parametrize("opt", [dict(optimizer="sgd", momentum=0.5, weight_decay=0.1),
                                 dict(optimizer="adam", weight_decay=0.1), dict(optimizer="adamw", weight_decay=0.5)])
def test_parameters_without_gradient_are_not_updated(opt):
    train, test = data("mse", n=9, n_test=3)
    model = _Unused().double()
    kw = dict(epochs=2, lr=0.05, batch_size=4, **opt)
    ref = sequential(model, train, test, [0, 3], [1], **kw)
    res = further_train(model, train, test, [0, 3], [1], dtype=torch.float64, progress=False, **kw)
    assert rel(res.losses, ref) < 1e-10
    assert res.config["parameters"] == ["lin.weight", "lin.bias"]


class _RandomForward(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(5, 1)

    def forward(self, x):
        return self.lin(torch.nn.functional.dropout(x, 0.5, self.training))


class _EMA(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(5, 1)
        self.register_buffer("avg", torch.zeros(5))

    def forward(self, x):
        if self.training:
            self.avg.mul_(0.9).add_(x.mean(0), alpha=0.1)
        return self.lin(x - self.avg)


@pytest.mark.parametrize("model,pattern", [
    (_RandomForward(), "training-mode forward draws random numbers"),
    (nn.Sequential(nn.Linear(5, 4), nn.Unflatten(1, (1, 4)), nn.InstanceNorm1d(1, track_running_stats=True),
                   nn.Flatten(), nn.Linear(4, 1)), "updates the buffers 2.running_mean, 2.running_var"),
    (nn.Sequential(nn.utils.parametrizations.spectral_norm(nn.Linear(5, 4)), nn.Linear(4, 1)),
     r"updates the buffers 0.parametrizations.weight.0._u"),
    (_EMA(), "updates the buffers avg"),
])
def test_forwards_that_draw_random_numbers_or_update_buffers_are_refused(model, pattern):
    """Each run of the sequential protocol would draw from the global generator or carry its own
    buffers; the ensemble cannot reproduce either (before: silently wrong, chunk-dependent numbers)."""
    train, test = data("mse")
    state = torch.get_rng_state()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=pattern):
        further_train(model, train, test, [0], [0], epochs=1, lr=0.1, batch_size=4, progress=False)
    assert torch.equal(state, torch.get_rng_state())
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


def test_grad_and_inference_modes_and_inputs_requiring_grad():
    train, test = data("mse")
    model = Residual()
    kw = dict(epochs=1, lr=0.05, batch_size=4, dtype=torch.float64, progress=False)
    want = further_train(model, train, test, [0], [0], **kw).losses
    X = train[0].clone().requires_grad_(True)
    got = further_train(model, (X, train[1]), test, [0], [0], **kw).losses
    assert torch.equal(got, want)
    with torch.inference_mode():
        X, Xt = train[0] + 0, test[0] + 0  # inference tensors
        got = further_train(model, (X, train[1]), (Xt, test[1]), [0], [0], **kw).losses
    assert torch.equal(got, want)
    with torch.no_grad():
        assert torch.equal(further_train(model, train, test, [0], [0], **kw).losses, want)


@pytest.mark.parametrize("loss,targets,pattern", [
    ("cross_entropy", lambda n: torch.zeros(n, 1, dtype=torch.int64), r"train\[1\] \(targets\): shape \(23, 1\)"),
    ("mse", lambda n: torch.zeros(n, 2), r"train\[1\] \(targets\): shape \(23, 2\)"),
])
def test_target_errors_name_the_argument_and_its_shape(loss, targets, pattern):
    (X, _), test = data("mse")
    model = mlp(out=3) if loss == "cross_entropy" else mlp()
    with pytest.raises(ValueError, match=pattern):
        further_train(model, (X, targets(23)), test, [0], [0], epochs=1, lr=0.1, batch_size=4, loss=loss,
                      progress=False)


def test_multi_output_mse_hints_at_cross_entropy():
    train, test = data("mse")
    with pytest.raises(ValueError, match="use loss='cross_entropy'"):
        further_train(mlp(out=3), train, test, [0], [0], epochs=1, lr=0.1, batch_size=4, progress=False)


def test_float32_runs_resolve_the_gold_of_confident_points():
    """Test losses are evaluated in float64 from the outputs: the leave-one-out differences of a
    confidently classified point's loss (1e-8 to 1e-13 here) are far below a float32 loss's rounding,
    which made whole gold rows exact zeros (3 of these 8). Float32 training still limits them: rows
    below ~1e-9 are training noise (cosine ~0 with the float64 run), larger ones agree."""
    (X, _), (Xt, _) = data("ce", n=600, n_test=8)
    model = mlp(out=3)
    with torch.no_grad():
        model[-1].weight.mul_(40)
        model[-1].bias.zero_()
        Y, Yt = model(X).argmax(1), model(Xt).argmax(1)  # correct and confident: losses 1e-2 to 1e-9
    kw = dict(epochs=2, lr=0.01, batch_size=8, loss="cross_entropy", progress=False)
    g32 = further_train(model, (X, Y), (Xt, Yt), list(range(10)), [0, 1], **kw).gold()[-1]
    g64 = further_train(model, (X, Y), (Xt, Yt), list(range(10)), [0, 1], dtype=torch.float64, **kw).gold()[-1]
    size = g64.abs().amax(1)
    assert (size > 0).all() and (g32.abs().amax(1) > 0).all()
    cos = torch.nn.functional.cosine_similarity(g32, g64, dim=1)
    assert (size > 1e-8).sum() >= 6 and cos[size > 1e-8].min() > 0.999


class _Branch(nn.Module):
    """Per-sample control flow: ``b`` is reached only by samples with x[0] <= 0 (not the first two)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = nn.Linear(3, 1), nn.Linear(3, 1)

    def forward(self, x):
        return torch.cat([(self.a if xi[0] > 0 else self.b)(xi[None]) for xi in x]).squeeze(-1)


def test_parameter_reached_by_some_samples_is_trained():
    """Which parameters the loss reaches is decided over the whole training set (a two-sample probe
    took ``b`` for unused, and the first batch reaching it crashed)."""
    g = torch.Generator().manual_seed(0)
    X = torch.randn(8, 3, generator=g)
    X[:2, 0] = X[:2, 0].abs() + 0.1
    X[2:, 0] = -X[2:, 0].abs() - 0.1
    Y, Xt, Yt = torch.randn(8, generator=g), -torch.rand(3, 3, generator=g) - 0.1, torch.randn(3, generator=g)
    model = _Branch().double()
    kw = dict(epochs=2, lr=0.1, batch_size=4)
    ref = sequential(model, (X, Y), (Xt, Yt), [1, 4], [0], **kw)
    with pytest.warns(Warning):  # vmap cannot batch the branch: one model at a time
        res = further_train(model, (X, Y), (Xt, Yt), [1, 4], [0], dtype=torch.float64, progress=False, **kw)
    assert res.config["parameters"] == ["a.weight", "a.bias", "b.weight", "b.bias"]
    assert rel(res.losses, ref) < 1e-10


class _ScaledOutput(Task):
    """A custom loss holding a float32 tensor: it cannot take float64 outputs."""

    def __init__(self):
        self.P = torch.tensor([[1.0], [2.0], [0.5]])

    def output(self, model_out, targets):
        return (model_out @ self.P).squeeze(-1)

    def phi(self, f, targets):
        return (f - targets) ** 2


class _CE(Task):
    """Cross-entropy as a custom loss."""

    def loss(self, model_out, targets):
        return F.cross_entropy(model_out, targets, reduction="none")


def test_custom_losses_and_float64_evaluation():
    """A custom loss that takes float64 outputs is evaluated in float64 under float32 training (no
    warning): confident points' losses of ~1e-10 round to exactly 0 in float32; one that refuses
    float64 outputs in float32, with a warning, equal to the sequential protocol."""
    (X, _), (Xt, _) = data("ce", n=30, n_test=8)
    confident = mlp(out=3)
    with torch.no_grad():
        confident[-1].weight.mul_(80)
        confident[-1].bias.zero_()
        Y, Yt = confident(X).argmax(1), confident(Xt).argmax(1)
        in_f32 = F.cross_entropy(confident(Xt), Yt, reduction="none")
    assert bool((in_f32 == 0).any())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        res = further_train(confident, (X, Y), (Xt, Yt), [0], [0], epochs=1, lr=0.01, batch_size=4, loss=_CE(),
                            progress=False)
        assert bool((res.losses[0] > 0).all())
    train, test = data("mse", n=9, n_test=3)
    kw = dict(epochs=1, lr=0.05, batch_size=4)
    model = mlp(out=3)
    ref = sequential(model, train, test, [0], [0], loss=_ScaledOutput(), dtype=torch.float32, **kw)
    with pytest.warns(UserWarning, match="does not take float64 outputs; the test losses are computed in torch.float32"):
        res = further_train(model, train, test, [0], [0], loss=_ScaledOutput(), path="generic", progress=False, **kw)
    assert res.losses.dtype == torch.float64 and rel(res.losses, ref) < 1e-5


_WRITES = {  # how the training forward writes buffer b
    "data": lambda m, x: m.b.data.mul_(0.5).add_(x.mean(0), alpha=0.5),  # its version counter stays
    "refill": lambda m, x: m.b.fill_(1.0),  # in place, to the values it holds
    "same": lambda m, x: setattr(m, "b", torch.ones(5, dtype=x.dtype)),  # a new tensor, same values
    "cache": lambda m, x: setattr(m, "b", (m.lin.weight[0] * 0 + 1).detach()),  # a cache of the parameters
    "after_use": lambda m, x: m.b.add_(0.0),  # after the loss used it: the backward fails
    "last_batch": lambda m, x: setattr(m, "b", x.detach().clone()),  # registered as None, then assigned
    "none": lambda m, x: setattr(m, "b", None),  # set to None
}


class _BufferWrite(nn.Module):
    """A Linear whose training forward writes its buffer ``b`` (the way ``how`` names)."""

    def __init__(self, how):
        super().__init__()
        torch.manual_seed(0)
        self.lin, self.how = nn.Linear(5, 1), how
        self.register_buffer("b", None if how == "last_batch" else torch.ones(5))

    def forward(self, x):
        b = torch.ones(5, dtype=x.dtype) if self.b is None else self.b
        out = self.lin(x * b) * b[..., :1]
        if self.training:
            _WRITES[self.how](self, x)
        return out


class _LateRandom(nn.Module):
    """Random numbers for some samples only (none of the first two)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(5, 1)

    def forward(self, x):
        noise = torch.cat([torch.randn(1, 5) if bool(xi[0] > 1.5) else torch.zeros(1, 5) for xi in x])
        return self.lin(x + (1e-3 * noise.to(x.dtype) if self.training else 0))


class _RandomEval(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(5, 1)

    def forward(self, x):
        return self.lin(x + (0 if self.training else 1e-3 * torch.randn_like(x)))


class _Detached(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(5, 1)

    def forward(self, x):
        return self.lin(x.detach()).detach().requires_grad_() * 1.0


@pytest.mark.parametrize("make,pattern", [
    *[(lambda how=how: _BufferWrite(how), "updates the buffers b") for how in _WRITES],
    (_LateRandom, "training-mode forward draws random numbers"),  # not in the first samples
    (_RandomEval, "eval-mode forward draws random numbers"),
    (_Detached, "no trainable parameter gets a gradient from the training loss"),
])
def test_buffer_writes_and_randomness_anywhere(make, pattern):
    """Every sample of the training set goes through one watched training-mode pass."""
    train, test = data("mse")
    assert bool((train[0][2:, 0] > 1.5).any()) and not bool((train[0][:2, 0] > 1.5).any())
    model = make()
    state = torch.get_rng_state()
    with pytest.raises(ValueError, match=pattern):
        further_train(model, train, test, [0], [0], epochs=2, lr=0.1, batch_size=4, progress=False)
    assert torch.equal(state, torch.get_rng_state())


class _LateRandomEval(nn.Module):
    """Random numbers in eval mode for batches of more than two samples (so past the two-sample probe)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(5, 1)

    def forward(self, x):
        if self.training or x.shape[0] <= 2:
            return self.lin(x)
        return self.lin(x + 1e-3 * torch.randn_like(x))


def test_whole_test_set_checked_once():
    """Every test input goes through the model before training: randomness past the first test sample
    and token ids out of range are named then."""
    train, test = data("mse")
    kw = dict(epochs=1, lr=0.1, batch_size=4, progress=False)
    with pytest.raises(ValueError, match="eval-mode forward draws random numbers"):
        further_train(_LateRandomEval(), train, test, [0], [0], **kw)
    g = torch.Generator().manual_seed(4)
    X, Xt = torch.randint(0, 11, (12, 5), generator=g), torch.randint(0, 11, (4, 5), generator=g)
    Xt[2, 1] = 11
    with pytest.raises(ValueError, match=r"test\[0\] \(inputs\): samples \[2\]: index out of range"):
        further_train(_Bag(), (X, train[1][:12]), (Xt, test[1][:4]), [0], [0], **kw)
    X[7, 0] = 40
    with pytest.raises(ValueError, match=r"train\[0\] \(inputs\): samples \[7\]: index out of range"):
        further_train(_Bag(), (X, train[1][:12]), (Xt, test[1][:4]), [0], [0], **kw)
    one = nn.Sequential(nn.Embedding(11, 1), nn.Flatten(0))  # one token per sample: inputs [N]
    with pytest.raises(ValueError, match=r"train\[0\] \(inputs\): samples \[7\]: index out of range"):
        further_train(one, (X[:, 0], train[1][:12]), (Xt[:, 0], test[1][:4]), [0], [0], **kw)


def test_integer_inputs_are_token_ids_only():
    train, test = data("mse")
    kw = dict(epochs=1, lr=0.1, batch_size=4, progress=False)
    with pytest.raises(TypeError, match=r"train\[0\] \(inputs\): expected a floating-point tensor .*got torch.uint8"):
        further_train(mlp(), (train[0].to(torch.uint8), train[1]), test, [0], [0], **kw)
    ints = (train[0] * 3).to(torch.int64)
    with pytest.raises(TypeError, match=r"train\[0\] \(inputs\): the model fails on these torch.int64 inputs"):
        further_train(mlp(), (ints, train[1]), (ints[:3], test[1][:3]), [0], [0], **kw)
    sparse = nn.Sequential(nn.Embedding(11, 4, sparse=True), nn.Flatten(), nn.Linear(20, 1))
    tokens = torch.randint(0, 11, (23, 5))
    with pytest.raises(ValueError, match="0: sparse=True"):
        further_train(sparse, (tokens, train[1]), (tokens[:3], test[1][:3]), [0], [0], **kw)


def test_checkpoint_and_result_formats(tmp_path):
    """A checkpoint of the previous format (losses in the training dtype) is refused; a saved result of
    it loads, widened to float64."""
    train, test = data("mse")
    kw = dict(epochs=1, lr=0.1, batch_size=4, progress=False)
    res = further_train(mlp(), train, test, [0], [0], checkpoint_dir=tmp_path / "c", **kw)
    ckpt = tmp_path / "c" / "further_training.pt"
    state = torch.load(ckpt, weights_only=True)
    torch.save(dict(state, format=1, losses=state["losses"].float()), ckpt)
    with pytest.raises(ValueError, match=r"checkpoint_dir: .* was written by another version .*format 1"):
        further_train(mlp(), train, test, [0], [0], checkpoint_dir=tmp_path / "c", **kw)
    res.save(tmp_path / "r.pt")
    state = torch.load(tmp_path / "r.pt", weights_only=True)
    torch.save(dict(state, format=1, losses=state["losses"].float()), tmp_path / "r1.pt")
    old = FurtherTrainingResult.load(tmp_path / "r1.pt")
    assert old.losses.dtype == torch.float64 and torch.allclose(old.losses, res.losses, rtol=1e-6)
