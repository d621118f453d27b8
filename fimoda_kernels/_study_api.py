"""The study runner's only contact with the attribution methods and the further-training engine.

Every call from ``experiment.py`` into ``fimoda_kernels.attribute`` / ``self_influence`` /
``further_train`` / ``FurtherTrainingResult`` / ``METHODS`` goes through here, looked up on the
package at call time, so a change in those signatures is fixed in this one file.
"""
from __future__ import annotations

import torch


def _pkg():
    import fimoda_kernels

    return fimoda_kernels


def further_training_diverged() -> type:
    """The exception further_train raises when a run's test loss leaves the dtype's range."""
    return _pkg().FurtherTrainingDivergedError


def method_names() -> tuple[str, ...]:
    return tuple(_pkg().METHODS)


def check_options(method: str, options: dict) -> None:
    """Validate ``options`` for ``method`` as ``attribute`` will (unknown names, bad values)."""
    from .methods._common import make_options

    make_options(_pkg().OPTIONS[method], method, dict(options))


def loo_scores(method: str, model, task, train, test, loo: torch.Tensor, options: dict) -> torch.Tensor:
    """Scores of the LOO training points for every test point, ``Tensor[n_loo, n_test]``."""
    scores = _pkg().attribute(method, model, task, train, test, **options)
    return scores[loo]


def loo_self_influence(method: str, model, task, train, loo: torch.Tensor, options: dict) -> torch.Tensor:
    """Self-influence of the LOO training points, ``Tensor[n_loo]``."""
    return _pkg().self_influence(method, model, task, train, **options)[loo]


def further_train(model, train, test, loo, seeds, *, epochs, optimizer, lr, batch_size, momentum,
                  weight_decay, mode, dtype, device, checkpoint_dir, loss, progress):
    return _pkg().further_train(model, train, test, [int(i) for i in loo], list(seeds), epochs=epochs,
                                optimizer=optimizer, lr=lr, batch_size=batch_size, momentum=momentum,
                                weight_decay=weight_decay, mode=mode, eval_every="epoch", dtype=dtype,
                                device=device, checkpoint_dir=checkpoint_dir, loss=loss, progress=progress)


def load_further_training(path):
    return _pkg().FurtherTrainingResult.load(path)


def gold(result, adjust: str, seed_positions=None) -> torch.Tensor:
    """``[n_evals, n_test, n_loo]`` averaged over the seeds at ``seed_positions`` (indices along
    the result's seed axis; None: all). ``FurtherTrainingResult.gold`` selects by seed *value*
    (``result.seeds``), so positions are translated here."""
    if seed_positions is None:
        return result.gold(adjust=adjust)
    values = list(getattr(result, "seeds", range(result.losses.shape[-1])))
    return result.gold(adjust=adjust, seeds=[values[k] for k in seed_positions])
