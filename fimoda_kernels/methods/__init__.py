"""Attribution methods behind one API (MATH.md §3, §7, §8).

``attribute(method, model, task, train, test, **options) -> Tensor[n_train, n_test]``: scores with
MATH.md's sign (positive = removing the training point raises the test loss). ``options`` are the
fields of the method's options dataclass (``OPTIONS[method]``); unknown names are an error.
``attribute_scores`` returns a :class:`Scores` with the resolved options, solver info, time and
optionally self-influence; ``self_influence`` gives score(i, i) for training points (mislabel
detection). The model is evaluated in eval mode and left in the mode it came in.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any

import torch

from .._validate import all_finite, check_choice
from . import cg as _cg, datainf as _datainf, ekfac as _ekfac, generalized_if as _gif, graddot as _gd
from . import lissa as _lissa, trak as _trak
from ._common import as_pair, check_problem, eval_mode, make_options

# method name -> (options dataclass, implementation(model, task, train, test, opts) -> (scores, info),
# self-influence(model, task, train, opts) -> ([n_train] score(i, i), info): each without the
# n_train × n_train scores, in chunks of training points under max_memory)
_METHODS = {
    "grad_dot": (_gd.GradDotOptions, _gd.grad_dot, _gd.grad_dot_self),
    "grad_cos": (_gd.GradCosOptions, _gd.grad_cos, _gd.grad_cos_self),
    "cg": (_cg.CGOptions, _cg.cg, _cg.cg_self),
    "lissa": (_lissa.LiSSAOptions, _lissa.lissa, _lissa.lissa_self),
    "lissa_h": (_lissa.LiSSAHOptions, _lissa.lissa_h, _lissa.lissa_h_self),
    "trak": (_trak.TRAKOptions, _trak.trak, _trak.trak_self),
    "ekfac": (_ekfac.EKFACOptions, _ekfac.ekfac, _ekfac.ekfac_self),
    "datainf": (_datainf.DataInfOptions, _datainf.datainf, _datainf.datainf_self),
    "generalized_if": (_gif.GeneralizedIFOptions, _gif.generalized_if, _gif.generalized_if_self),
}
METHODS = tuple(_METHODS)
OPTIONS = {name: cls for name, (cls, _, _) in _METHODS.items()}


@dataclasses.dataclass
class Scores:
    """Result of :func:`attribute_scores`.

    Attributes:
        method: the method's name. options: the options dataclass as used (defaults filled in).
        scores: ``[n_train, n_test]`` or None when no test set was given.
        self_influence: ``[n_train]`` score(i, i), or None unless requested.
        info: what the method resolved or measured (damping, chosen LiSSA scale, CG residuals, ...).
        seconds: wall time.
    """
    method: str
    options: Any
    scores: torch.Tensor | None
    self_influence: torch.Tensor | None
    info: dict
    seconds: float


def _run(method, model, task, train, test, options, want_scores, want_self):
    method = check_choice("method", method, METHODS)
    cls, fn, self_fn = _METHODS[method]
    opts = make_options(cls, method, options)
    if want_scores and test is None:
        raise ValueError("test: expected an (inputs, targets) pair or a DataLoader, got None")
    start = time.perf_counter()
    scores = self_inf = None
    info: dict = {}
    with eval_mode(model):  # as documented: a model passed in training mode is attributed in eval mode
        task, train, test = check_problem(model, task, train, test)
        if want_scores:
            scores, info = fn(model, task, train, test, opts)
        if want_self:
            self_inf, self_info = self_fn(model, task, train, opts)
            info = info or self_info
    for name, value in (("scores", scores), ("self_influence", self_inf)):
        if value is not None and not all_finite(value):
            raise FloatingPointError(f"{method}: non-finite {name} (check the model, data and options {opts})")
    return Scores(method, opts, scores, self_inf, info, time.perf_counter() - start)


def attribute(method: str, model: torch.nn.Module, task, train, test, **options) -> torch.Tensor:
    """Scores ``[n_train, n_test]`` of ``method`` (one of :data:`METHODS`).

    Args:
        model: the final model (evaluated in eval mode). task: a :class:`Task` or its name
            ("mse", "cross_entropy", ...). train, test: ``(inputs, targets)`` pairs or DataLoaders.
        options: fields of ``OPTIONS[method]`` (e.g. ``damping=``, ``depth=``, ``scale=``,
            ``proj_dim=``, ``seed=``, ``form=``; plus ``max_memory``, ``backend``).
    """
    return _run(method, model, task, train, test, options, True, False).scores


def attribute_scores(method: str, model: torch.nn.Module, task, train, test=None, self_influence: bool = False,
                     **options) -> Scores:
    """Like :func:`attribute` but returns a :class:`Scores` (options used, info, time) and, with
    ``self_influence=True``, score(i, i) for every training point; ``test`` may then be None."""
    if test is None and not self_influence:
        raise ValueError("test: expected an (inputs, targets) pair or a DataLoader (None is allowed only "
                         "with self_influence=True), got None")
    return _run(method, model, task, train, test, options, test is not None, self_influence)


def self_influence(method: str, model: torch.nn.Module, task, train, **options) -> torch.Tensor:
    """score(i, i) ``[n_train]``: each training point scored against itself as the test point.

    After the method's one-time work (EK-FAC's fit, DataInf's reference set, TRAK's pseudo-inverse,
    the generalized IF's Newton step), chunks of training points sized by ``max_memory`` are their
    own test sets: the n_train × n_train scores are never formed, nor n_train × p gradients at once.
    CG/LiSSA solve once per training point (n_train right-hand sides in all), every chunk at one
    scale, as one batched call: with ``scale="auto"`` a chunk that diverges at the scale the first
    chunk chose sends every chunk one rung up the ladder."""
    return _run(method, model, task, train, None, options, False, True).self_influence


__all__ = ["METHODS", "OPTIONS", "Scores", "attribute", "attribute_scores", "self_influence", "as_pair"]
