"""Tasks (MATH.md §1): φ, φ', φ'' against autograd and torch's losses; argument checks."""
import pytest
import torch
import torch.nn.functional as F

from fimoda_kernels.tasks import CrossEntropyTask, MSETask, Task, get_task, output_derivatives

D = torch.float64


def _ce_batch(n, classes, scale=3.0):
    return torch.randn(n, classes, dtype=D) * scale, torch.randint(0, classes, (n,))


def _f_and_targets(task, n=23):
    if isinstance(task, MSETask):
        return torch.randn(n, dtype=D) * 3, torch.randn(n, dtype=D)
    return torch.randn(n, dtype=D) * 4, torch.randint(0, 5, (n,))


@pytest.mark.parametrize("task", [MSETask(), CrossEntropyTask()], ids=repr)
def test_derivatives_match_autograd(task):
    f, y = _f_and_targets(task)
    f.requires_grad_(True)
    # samples are independent, so d/df of the summed φ is φ' per element (same for φ'')
    d1, = torch.autograd.grad(task.phi(f, y).sum(), f, create_graph=True)
    d2, = torch.autograd.grad(d1.sum(), f)
    torch.testing.assert_close(task.dloss(f, y), d1, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(task.d2loss(f, y), d2, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("out_shape", [(11,), (11, 1)])
@pytest.mark.parametrize("y_shape", [(11,), (11, 1)])
def test_mse_loss_is_squared_error(out_shape, y_shape):
    task = MSETask()
    out, y = torch.randn(out_shape, dtype=D), torch.randn(y_shape, dtype=D)
    expect = (out.reshape(-1) - y.reshape(-1)) ** 2
    torch.testing.assert_close(task.output(out, y), out.reshape(-1), rtol=0, atol=0)
    torch.testing.assert_close(task.loss(out, y), expect, rtol=1e-15, atol=0)
    torch.testing.assert_close(F.mse_loss(out.reshape(-1), y.reshape(-1), reduction="none"), expect)


@pytest.mark.parametrize("classes", [2, 10])
def test_ce_margin_and_loss(classes):
    task = CrossEntropyTask()
    logits, y = _ce_batch(31, classes)
    f = task.output(logits, y)
    p = logits.softmax(1).gather(1, y[:, None]).squeeze(1)
    torch.testing.assert_close(f, torch.log(p / (1 - p)), rtol=1e-10, atol=1e-10)
    if classes == 2:
        torch.testing.assert_close(f, logits.gather(1, y[:, None]).squeeze(1)
                                   - logits.gather(1, 1 - y[:, None]).squeeze(1))
    ce = F.cross_entropy(logits, y, reduction="none")
    torch.testing.assert_close(task.loss(logits, y), ce, rtol=1e-13, atol=1e-14)
    torch.testing.assert_close(task.phi(f, y), ce, rtol=1e-12, atol=1e-14)  # loss via f
    torch.testing.assert_close(-task.dloss(f, y), 1 - p, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(task.d2loss(f, y), p * (1 - p), rtol=1e-10, atol=1e-14)


def test_ce_stable_for_large_logits():
    task = CrossEntropyTask()
    logits = torch.tensor([[1000.0, -1000.0, 0.0], [-800.0, 800.0, 799.0]], dtype=torch.float32)
    y = torch.tensor([0, 2])
    f = task.output(logits, y)
    assert torch.isfinite(f).all()
    torch.testing.assert_close(f, torch.tensor([1000.0, -1.0]))
    torch.testing.assert_close(task.phi(f, y), F.cross_entropy(logits, y, reduction="none"))
    assert torch.isfinite(task.dloss(f, y)).all() and torch.isfinite(task.d2loss(f, y)).all()


def test_int32_targets_accepted():
    logits, y = _ce_batch(6, 4)
    task = CrossEntropyTask()
    torch.testing.assert_close(task.output(logits, y.int()), task.output(logits, y))


def test_get_task():
    assert isinstance(get_task("mse"), MSETask) and isinstance(get_task("regression_mse"), MSETask)
    assert isinstance(get_task("cross_entropy"), CrossEntropyTask)
    assert isinstance(get_task("classification_ce"), CrossEntropyTask)
    t = CrossEntropyTask()
    assert get_task(t) is t
    with pytest.raises(ValueError, match="task.*mse.*'hinge'"):
        get_task("hinge")
    with pytest.raises(TypeError, match="task"):
        get_task(MSETask)  # the class, not an instance


def test_user_subclass_gets_loss_from_phi():
    class Half(Task):  # f = first output, φ = f²/2 − y f
        def output(self, model_out, targets):
            return model_out[:, 0]

        def phi(self, f, targets):
            return f * f / 2 - targets * f

        def dloss(self, f, targets):
            return f - targets

        def d2loss(self, f, targets):
            return torch.ones_like(f)

    out, y = torch.randn(5, 3, dtype=D), torch.randn(5, dtype=D)
    torch.testing.assert_close(get_task(Half()).loss(out, y), out[:, 0] ** 2 / 2 - y * out[:, 0])


MSE, CE = MSETask(), CrossEntropyTask()
LONG = dict(dtype=torch.long)


@pytest.mark.parametrize("call, exc, match", [
    (lambda: MSE.output(torch.randn(4, 3), torch.randn(4)), ValueError, r"model_out.*\[n, 1\].*\(4, 3\)"),
    (lambda: MSE.loss(torch.randn(4, 1), torch.randn(5)), ValueError, r"targets.*4.*\(5,\)"),
    (lambda: MSE.loss(torch.randn(4, 1), torch.randn(4, 2)), ValueError, r"targets.*\(4, 2\)"),
    (lambda: MSE.loss(torch.randn(4, 1), [1.0] * 4), TypeError, "targets.*list"),
    (lambda: MSE.dloss(torch.randn(4, 1), torch.randn(4)), ValueError, "f: expected a 1-D"),
    (lambda: MSE.output(torch.randint(0, 3, (4,)), torch.randn(4)), TypeError, "model_out.*int64"),
    (lambda: CE.loss(torch.randn(4, 3), torch.rand(4)), TypeError, "targets.*float32"),
    (lambda: CE.output(torch.randn(4, 3), torch.tensor([0, 1, 3, 2])), ValueError,
     r"targets.*\[0, 3\).*\[0, 3\]"),
    (lambda: CE.loss(torch.randn(4, 3), torch.tensor([0, -1, 1, 2])), ValueError, "targets"),
    (lambda: CE.loss(torch.randn(4, 3), torch.tensor([0, 1, 2])), ValueError, "targets.*4"),
    (lambda: CE.output(torch.randn(4), torch.tensor([0, 1, 2, 0])), ValueError, "model_out.*2-D"),
    (lambda: CE.output(torch.randn(4, 1), torch.zeros(4, **LONG)), ValueError, "model_out.*C >= 2"),
    (lambda: CE.d2loss(torch.randn(4), torch.zeros(3, **LONG)), ValueError, "targets"),
])
def test_bad_inputs_name_the_argument(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


class _PlainMSE(MSETask):
    """Same loss, not exactly MSETask: output_derivatives takes its autograd / torch.func branch."""


class _PlainCE(CrossEntropyTask):
    pass


@pytest.mark.parametrize("kind", ["mse", "ce"])
@pytest.mark.parametrize("lead", [(7,), (3, 5)])
def test_output_derivatives_closed_forms_match_autograd(kind, lead):
    """g = ∂(Σ w ℓ)/∂out and its derivative along r tangents, closed form vs the generic branch, for
    any leading sample shape (the HVP uses [c], further training [M, W])."""
    C = 1 if kind == "mse" else 4
    out = torch.randn(*lead, C, dtype=D) * 2
    y = torch.randn(*lead, dtype=D) if kind == "mse" else torch.randint(0, C, lead)
    w = torch.rand(*lead, dtype=D) - 0.2  # negative weights too (the downweight mode)
    t = torch.randn(*lead, 3, C, dtype=D)
    exact, generic = (MSETask(), _PlainMSE()) if kind == "mse" else (CrossEntropyTask(), _PlainCE())
    g, Rg = output_derivatives(exact, out, y, w, t)
    g_ref, Rg_ref = output_derivatives(generic, out, y, w, t)
    assert g.shape == out.shape and Rg.shape == t.shape
    torch.testing.assert_close(g, g_ref, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(Rg, Rg_ref, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(output_derivatives(exact, out, y, w), g, rtol=0, atol=0)
    torch.testing.assert_close(output_derivatives(generic, out, y, w), g_ref, rtol=0, atol=0)
    # the tangent derivative is the Hessian action: finite difference of g along t[..., 0, :]
    eps = 1e-6
    fd = (output_derivatives(exact, out + eps * t[..., 0, :], y, w)
          - output_derivatives(exact, out - eps * t[..., 0, :], y, w)) / (2 * eps)
    torch.testing.assert_close(Rg[..., 0, :], fd, rtol=1e-6, atol=1e-8)
