"""The FiMODA study (paper §6): final model → approximate methods → further-training gold standard
→ how well each method approximates the gold as further training proceeds (MATH.md §2, §10).

``run_study(StudyConfig(...))`` runs the stages

1. data: load and split/standardize; pick the LOO set S (seeded) and the test points; for
   classification flip the labels of a fraction of S (seeded) for the mislabel-detection study;
2. final model: train θ* with SGD from a seed-0 init;
3. methods: ``attribute`` for every method (timed), plus ``self_influence`` when labels were flipped;
4. gold: LOO further training of all (|S| + 1) × R models (``further_train``); when labels were
   flipped the LOO points are appended as extra test points, giving the gold self-influence;
5. metrics: cosine / Spearman curves, peaks, the seed-count study, mislabel AUCs;
6. artifacts: results.json, scores.npz, curves.csv, seeds.csv and PNG plots under ``config.out``.

Stages 2–4 are cached under ``config.cache_dir`` (default ``<out>/cache``), each keyed by a hash of
exactly what it depends on, so a re-run that only adds methods reuses the final model and the gold.
``results.json["stages"]`` records for every cached stage whether it was computed or loaded.
"""
from __future__ import annotations

import contextlib
import csv
import dataclasses
import functools
import hashlib
import json
import math
import os
import platform
import shutil
import sys
import time
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

from . import _study_api as api
from ._validate import all_finite, check_choice, check_float, check_int
from .datasets import EMBEDDED_DATASETS, Dataset, load_csv, load_embedded
from .models import TrainingDivergedError, build_model, default_training, evaluate_model, task_for, train_final_model

__all__ = ["StudyConfig", "StudyConfigError", "StudyResult", "run_study"]

OPTIMIZERS = ("sgd", "adam", "adamw")
MODES = ("remove", "downweight")
ADJUSTS = ("mean", "full")
DTYPES = {"float32": torch.float32, "float64": torch.float64}
# further-training lr = final lr / this (paper App. D.3: one order of magnitude smaller for SGD,
# smaller still for Adam, "a more powerful optimizer")
FURTHER_LR_DIVISOR = {"sgd": 10.0, "adam": 100.0, "adamw": 100.0}


class StudyConfigError(ValueError):
    """A study configuration that cannot run (bad value, unknown method, n_loo > n_train, …)."""


class StudyRunError(RuntimeError):
    """A stage that cannot run with these settings (training diverged, an unusable output directory)."""


class MissingDependencyError(ImportError):
    """An optional dependency of the study runner (scikit-learn, scipy, matplotlib, tqdm) is absent."""


@dataclass
class StudyConfig:
    """Everything a study depends on. ``None`` fields take documented defaults at run time."""
    dataset: str = "diabetes"            # embedded set (ignored when ``csv`` is given)
    csv: str | None = None               # CSV path; then ``target`` is required
    target: str | None = None
    drop: Sequence[str] = ()
    task: str = "regression"             # CSV only: "regression" | "classification"
    methods: str | Sequence[str] = "all"  # "all" or method names (see fimoda_kernels.METHODS)
    method_options: dict = field(default_factory=dict)  # {method: {option: value}} for attribute()
    seeds: int = 10                      # R: further-training seeds 1..R
    epochs: int = 50                     # further-training epochs (evaluated after each)
    n_loo: int = 100                     # |S|, drawn without replacement (seeded)
    n_test: int | None = None            # test points evaluated (None: all)
    final_lr: float | None = None        # None: models.DEFAULT_TRAINING for the set
    final_epochs: int | None = None
    batch_size: int = 128
    further_lr: float | None = None      # None: final_lr / 10 (SGD) or / 100 (Adam, AdamW)
    optimizer: str = "sgd"
    momentum: float = 0.0
    weight_decay: float = 0.0
    mode: str = "remove"
    adjust: str = "mean"
    mislabel_fraction: float = 0.2       # classification: share of S whose labels are flipped (0: off)
    seed: int = 0                        # model init, final-training order, S, test subset, flips
    device: str = "cpu"
    dtype: str = "float32"
    out: str | None = None               # None: runs/<dataset>
    cache_dir: str | None = None         # None: <out>/cache
    progress: bool = True
    plots: bool = True

    def __post_init__(self):
        try:
            self._validate()
        except (ValueError, TypeError) as e:
            if isinstance(e, StudyConfigError):
                raise
            raise StudyConfigError(str(e)) from None

    def _validate(self):
        if self.csv is None:
            check_choice("dataset", self.dataset, EMBEDDED_DATASETS)
        else:
            if not isinstance(self.target, str) or not self.target:
                raise StudyConfigError("target: a CSV study needs the target column (--target COLUMN)")
            check_choice("task", self.task, ("regression", "classification"))
        if isinstance(self.drop, str):
            self.drop = (self.drop,)
        self.drop = tuple(self.drop)
        if isinstance(self.methods, str):
            self.methods = "all" if self.methods == "all" else tuple(
                m.strip() for m in self.methods.split(",") if m.strip())
        else:
            self.methods = tuple(self.methods)
        if not self.methods:
            raise StudyConfigError("methods: expected 'all' or at least one method name, got none")
        if not isinstance(self.method_options, dict):
            raise StudyConfigError(f"method_options: expected a dict {{method: {{option: value}}}}, "
                                   f"got {type(self.method_options).__name__}")
        check_int("seeds", self.seeds, min_value=1)
        check_int("epochs", self.epochs, min_value=1)
        check_int("n_loo", self.n_loo, min_value=2)
        if self.n_test is not None:
            check_int("n_test", self.n_test, min_value=1)
        if self.final_lr is not None:
            check_float("final_lr", self.final_lr, positive=True)
        if self.final_epochs is not None:
            check_int("final_epochs", self.final_epochs, min_value=1)
        check_int("batch_size", self.batch_size, min_value=1)
        if self.further_lr is not None:
            check_float("further_lr", self.further_lr, positive=True)
        check_choice("optimizer", self.optimizer, OPTIMIZERS)
        check_float("momentum", self.momentum, min_value=0.0)
        check_float("weight_decay", self.weight_decay, min_value=0.0)
        check_choice("mode", self.mode, MODES)
        check_choice("adjust", self.adjust, ADJUSTS)
        f = check_float("mislabel_fraction", self.mislabel_fraction, min_value=0.0)
        if f >= 1:
            raise StudyConfigError(f"mislabel_fraction: expected a number in [0, 1), got {f}")
        check_int("seed", self.seed, min_value=0, max_value=2**64 - 1)  # torch.manual_seed's range
        check_choice("dtype", self.dtype, list(DTYPES))
        if not isinstance(self.device, str):
            raise StudyConfigError(f"device: expected a string such as 'cpu' or 'cuda', got {self.device!r}")
        try:
            dev = torch.device(self.device)
        except RuntimeError:
            raise StudyConfigError(f"device: expected 'cpu' or 'cuda[:k]', got {self.device!r}") from None
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise StudyConfigError("device: 'cuda' requested but no CUDA device is available")
        if dev.type not in ("cpu", "cuda"):
            raise StudyConfigError(f"device: expected 'cpu' or 'cuda[:k]', got {self.device!r}")

    @property
    def name(self) -> str:
        return os.path.splitext(os.path.basename(self.csv))[0] if self.csv else self.dataset

    @property
    def out_dir(self) -> str:
        return self.out or os.path.join("runs", self.name)

    @property
    def cache(self) -> str:
        return self.cache_dir or os.path.join(self.out_dir, "cache")

    def resolved_methods(self) -> tuple[str, ...]:
        """The selected methods, with every method option checked before anything trains (a typo in
        a name or a value would otherwise surface, if at all, as a failed row after the study)."""
        known = api.method_names()
        bad = [] if self.methods == "all" else [m for m in self.methods if m not in known]
        if "all" in bad:
            raise StudyConfigError("methods: 'all' selects every method; give it alone, or only method names")
        if bad:
            raise StudyConfigError(f"methods: unknown {', '.join(map(repr, bad))}; expected 'all' or "
                                   f"names from {', '.join(known)}")
        selected = known if self.methods == "all" else tuple(dict.fromkeys(self.methods))
        unknown_opts = [m for m in self.method_options if m not in known]
        if unknown_opts:
            raise StudyConfigError(f"method_options: unknown method(s) {unknown_opts}; expected names from "
                                   f"{', '.join(known)}")
        unused = [m for m in self.method_options if m not in selected]
        if unused:
            raise StudyConfigError(f"method_options: options for method(s) {unused} that the study does not "
                                   f"run (methods: {', '.join(selected)})")
        for m, opts in self.method_options.items():
            try:
                api.check_options(m, opts)
            except (TypeError, ValueError) as e:
                raise StudyConfigError(f"method_options[{m!r}]: {e}") from e
        return selected


@dataclass
class StudyResult:
    """What ``run_study`` returns: the results.json content, the arrays behind the plots, and
    where the artifacts were written."""
    config: StudyConfig
    out_dir: str
    results: dict
    gold: np.ndarray                 # [n_evals, n_test, n_loo]
    eval_points: np.ndarray
    scores: dict                     # method -> [n_loo, n_test]
    curves: dict                     # method -> metrics.similarity_curves output
    artifacts: list

    def table(self) -> str:
        return summary_table(self.results)


# ---------------------------------------------------------------------------------------- helpers

def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


@functools.lru_cache(maxsize=1)
def _code_digest() -> str:
    """The package's Python sources and native module, and the versions of the libraries that compute
    with them: part of every stage key, so a cached stage is not reused by a build (or a torch, numpy,
    scikit-learn, scipy) that could compute it differently."""
    root = os.path.dirname(os.path.abspath(__file__))
    h = hashlib.sha256()
    versions = _versions()
    h.update(json.dumps({k: versions[k] for k in ("torch", "numpy", "sklearn", "scipy")}, sort_keys=True).encode())
    for dirpath, dirnames, files in sorted(os.walk(root)):
        dirnames.sort()
        for name in sorted(files):
            if name.endswith((".py", ".so", ".pyd")):
                path = os.path.join(dirpath, name)
                h.update(os.path.relpath(path, root).encode())
                h.update(_file_digest(path).encode())
    return h.hexdigest()[:16]


def _file_digest(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def _jsonable(x):
    """numpy/torch scalars and arrays → plain JSON; NaN/Inf → null (JSON has no NaN)."""
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.ndarray, torch.Tensor)):
        return _jsonable(np.asarray(x.cpu() if isinstance(x, torch.Tensor) else x).tolist())
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (float, np.floating)):
        x = float(x)
        return x if math.isfinite(x) else None
    return x


def _log(config: StudyConfig, msg: str) -> None:
    if config.progress:
        print(f"[fimoda] {msg}", file=sys.stderr, flush=True)


def _versions() -> dict:
    import fimoda_kernels

    v = {"fimoda_kernels": fimoda_kernels.__version__, "python": platform.python_version(),
         "torch": torch.__version__, "numpy": np.__version__, "platform": platform.platform()}
    for mod in ("scipy", "sklearn", "matplotlib"):
        try:
            v[mod] = __import__(mod).__version__
        except ImportError:
            v[mod] = None
    return v


class _Stages:
    """Cached-stage bookkeeping: files ``<cache>/<stage>-<key>.pt`` and a log for results.json."""

    def __init__(self, cache_dir: str):
        self.dir = cache_dir
        os.makedirs(cache_dir, exist_ok=True)
        self.log: list[dict] = []

    def path(self, stage: str, key: str, suffix: str = ".pt") -> str:
        return os.path.join(self.dir, f"{stage}-{key}{suffix}")

    def record(self, stage: str, key: str, cached: bool, seconds: float) -> None:
        self.log.append({"stage": stage, "key": key, "cached": cached, "seconds": round(seconds, 4)})


def _save_atomic(obj, path: str) -> None:
    tmp = f"{path}.{os.getpid()}.tmp"  # two runs sharing a cache do not write one temporary file
    torch.save(obj, tmp)
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------------ stages

@dataclass
class _Data:
    ds: Dataset
    key: str
    embedded: bool
    loo: np.ndarray          # indices into the training set, sorted
    test_idx: np.ndarray     # indices into the test set
    flipped: np.ndarray      # bool [n_loo]; all False when no flips
    y_train: torch.Tensor    # training targets after flips


def _load_data(config: StudyConfig) -> _Data:
    dtype = DTYPES[config.dtype]
    if config.csv is not None:
        ds = load_csv(config.csv, config.target, config.drop, config.task, dtype=dtype)
        source = {"csv": os.path.abspath(config.csv), "sha": _file_digest(config.csv), "target": config.target,
                  "drop": list(config.drop), "task": config.task}
    else:
        ds = load_embedded(config.dataset, dtype=dtype)
        source = {"dataset": config.dataset}
    n_train, n_test = ds.x_train.shape[0], ds.x_test.shape[0]
    if config.n_loo > n_train:
        raise StudyConfigError(f"n_loo: expected at most the {n_train} training points of {ds.name}, got {config.n_loo}")
    if config.n_test is not None and config.n_test > n_test:
        raise StudyConfigError(f"n_test: expected at most the {n_test} test points of {ds.name}, got {config.n_test}")
    rng = np.random.default_rng(config.seed)
    loo = np.sort(rng.choice(n_train, config.n_loo, replace=False))
    test_idx = (np.arange(n_test) if config.n_test is None
                else np.sort(np.random.default_rng([config.seed, 1]).choice(n_test, config.n_test, replace=False)))
    flipped = np.zeros(config.n_loo, bool)
    y_train = ds.y_train.clone()
    if ds.task == "classification" and config.mislabel_fraction > 0:
        n_flip = int(round(config.mislabel_fraction * config.n_loo))
        if not 1 <= n_flip < config.n_loo:
            raise StudyConfigError(f"mislabel_fraction: {config.mislabel_fraction} of n_loo = {config.n_loo} flips "
                                   f"{n_flip} labels; need at least one flipped and one clean point (or 0 to disable)")
        frng = np.random.default_rng([config.seed, 2])
        pick = np.sort(frng.choice(config.n_loo, n_flip, replace=False))
        flipped[pick] = True
        idx = torch.from_numpy(loo[pick])
        # a different class, uniformly among the other C − 1 (for binary: the other one)
        shift = torch.from_numpy(frng.integers(1, ds.n_classes, n_flip))
        y_train[idx] = (y_train[idx] + shift) % ds.n_classes
    key = _digest({"source": source, "dtype": config.dtype, "split": "train_test_split(0.1, 0)+standardize"})
    return _Data(ds, key, config.csv is None, loo, test_idx, flipped, y_train)


def _final_model(config: StudyConfig, data: _Data, stages: _Stages):
    lr, epochs = default_training(data.ds, data.embedded)
    lr = config.final_lr if config.final_lr is not None else lr
    epochs = config.final_epochs if config.final_epochs is not None else epochs
    spec = {"code": _code_digest(), "data": data.key, "flips": data.loo[data.flipped].tolist(),
            "arch": "cnn" if data.ds.is_image else "mlp",
            "lr": lr, "epochs": epochs, "batch_size": config.batch_size, "seed": config.seed,
            "device": torch.device(config.device).type, "dtype": config.dtype}
    key = _digest(spec)
    path = stages.path("final", key)
    model = build_model(data.ds, seed=config.seed)
    t0 = time.perf_counter()
    if os.path.exists(path):
        saved = torch.load(path, weights_only=True)
        model.load_state_dict(saved["state_dict"])
        model.to(config.device).eval()
        history, cached = saved["history"], True
    else:
        ds = dataclasses.replace(data.ds, y_train=data.y_train)
        try:
            history = train_final_model(model, ds, lr, epochs, config.batch_size, seed=config.seed,
                                        device=config.device, progress=config.progress)
        except TrainingDivergedError as e:
            raise StudyRunError(f"{e} (--final-lr)") from e
        _save_atomic({"state_dict": {k: v.cpu() for k, v in model.state_dict().items()}, "history": history}, path)
        cached = False
    stages.record("final_model", key, cached, time.perf_counter() - t0)
    ds = dataclasses.replace(data.ds, y_train=data.y_train)
    info = {"lr": lr, "epochs": epochs, "batch_size": config.batch_size, "optimizer": "sgd",
            "final_epoch_train_loss": history[-1], **evaluate_model(model, ds, config.device)}
    return model, key, lr, info


def _method_stage(config, data, model, final_key, methods, stages, train, test):
    task = task_for(data.ds)
    loo = torch.from_numpy(data.loo)
    with_self = bool(data.flipped.any())
    out = {}
    it = methods
    if config.progress:
        from tqdm.auto import tqdm
        it = tqdm(methods, desc="methods", unit="method", leave=False)
    for m in it:
        opts = dict(config.method_options.get(m, {}))
        key = _digest({"final": final_key, "method": m, "options": opts, "loo": data.loo.tolist(),
                       "test": data.test_idx.tolist(), "self": with_self})
        path = stages.path(f"method-{m}", key)
        t0 = time.perf_counter()
        if os.path.exists(path):
            rec = torch.load(path, weights_only=True)
            cached = True
        else:
            rec = {"error": None, "seconds": None, "self_seconds": None}
            try:
                t = time.perf_counter()
                s = api.loo_scores(m, model, task, train, test, loo, opts)
                rec["seconds"] = time.perf_counter() - t
                rec["scores"] = s.detach().double().cpu()
                if tuple(rec["scores"].shape) != (len(data.loo), test[0].shape[0]):
                    raise RuntimeError(f"expected scores of shape {(len(data.loo), test[0].shape[0])} for the "
                                       f"LOO rows, got {tuple(rec['scores'].shape)}")
                if with_self:
                    t = time.perf_counter()
                    rec["self"] = api.loo_self_influence(m, model, task, train, loo, opts).detach().double().cpu()
                    rec["self_seconds"] = time.perf_counter() - t
                bad = [k for k in ("scores", "self") if k in rec and not all_finite(rec[k])]
                if bad:
                    raise RuntimeError(f"non-finite {' and '.join(bad)}")
            except Exception as e:  # one failing method must not lose the others' results
                rec = {"error": f"{type(e).__name__}: {e}", "seconds": None, "self_seconds": None}
                print(f"[fimoda] method {m} failed: {rec['error']}", file=sys.stderr, flush=True)
            if rec["error"] is None:  # failures are not cached: a fixed method re-runs
                _save_atomic(rec, path)
            cached = False
        stages.record(f"method:{m}", key, cached, time.perf_counter() - t0)
        rec["options"] = opts
        out[m] = rec
    return out


def _gold_stage(config, data, model, final_key, final_lr, stages, train, test):
    """Further training; returns (result, further lr, seeds, n_test) — the result's test axis holds
    the study's test points, then (with flips) the LOO points themselves."""
    further_lr = config.further_lr if config.further_lr is not None else final_lr / FURTHER_LR_DIVISOR[config.optimizer]
    seeds = list(range(1, config.seeds + 1))
    x_test, y_test = test
    if data.flipped.any():
        loo = torch.from_numpy(data.loo)
        x_test = torch.cat([x_test, train[0][loo.to(train[0].device)]])
        y_test = torch.cat([y_test, train[1][loo.to(train[1].device)]])
    spec = {"final": final_key, "loo": data.loo.tolist(), "test": data.test_idx.tolist(),
            "self": bool(data.flipped.any()), "seeds": seeds, "epochs": config.epochs, "lr": further_lr,
            "optimizer": config.optimizer, "momentum": config.momentum, "weight_decay": config.weight_decay,
            "batch_size": config.batch_size, "mode": config.mode, "dtype": config.dtype,
            "device": torch.device(config.device).type}
    key = _digest(spec)
    path = stages.path("gold", key)
    t0 = time.perf_counter()
    if os.path.exists(path):
        result, cached = api.load_further_training(path), True
    else:
        _log(config, f"further training {(len(data.loo) + 1) * len(seeds)} models × {config.epochs} epochs "
                     f"({config.optimizer}, lr {further_lr:g}, mode {config.mode})")
        ckpt = stages.path("gold", key, ".ckpt")
        os.makedirs(ckpt, exist_ok=True)
        try:
            result = api.further_train(model, train, (x_test, y_test), data.loo, seeds, epochs=config.epochs,
                                       optimizer=config.optimizer, lr=further_lr, batch_size=config.batch_size,
                                       momentum=config.momentum, weight_decay=config.weight_decay,
                                       mode=config.mode, dtype=DTYPES[config.dtype],
                                       device=torch.device(config.device), checkpoint_dir=ckpt,
                                       loss=task_for(data.ds), progress=config.progress)
        except api.further_training_diverged() as e:  # it names lr; the setting is the study's
            raise StudyRunError(f"further training: {e} (--further-lr)") from e
        result.save(path)
        shutil.rmtree(ckpt, ignore_errors=True)  # the saved result supersedes the resume checkpoints
        cached = False
    stages.record("gold", key, cached, time.perf_counter() - t0)
    losses = result.losses
    if not all_finite(losses):
        raise StudyRunError(f"further training produced non-finite test losses (diverged); use a smaller "
                           f"further-training learning rate than {further_lr:g}")
    return result, further_lr, seeds


def _check_study_dependencies(config: StudyConfig) -> None:
    import importlib.util

    needed = ["sklearn", "scipy"] + (["matplotlib"] if config.plots else []) + (["tqdm"] if config.progress else [])
    missing = [m for m in needed if importlib.util.find_spec(m) is None]
    if missing:
        raise MissingDependencyError(f"the study runner needs {', '.join(missing)}: pip install 'fimoda_kernels[study]'")


# ------------------------------------------------------------------------------------------- main

def run_study(config: StudyConfig) -> StudyResult:
    """Run (or resume from cache) the whole study of ``config``; write the artifacts under
    ``config.out_dir`` and return them as a :class:`StudyResult`."""
    if not isinstance(config, StudyConfig):
        raise TypeError(f"config: expected a StudyConfig, got {type(config).__name__}")
    _check_study_dependencies(config)  # before metrics imports scipy: a clear message, not an ImportError
    from . import metrics

    t_start = time.perf_counter()
    timings = {}
    t = time.perf_counter()
    data = _load_data(config)
    timings["data"] = time.perf_counter() - t
    methods = config.resolved_methods()
    ds = data.ds
    try:
        os.makedirs(config.out_dir, exist_ok=True)
        stages = _Stages(config.cache)
    except OSError as e:
        raise StudyRunError(f"out / cache_dir: cannot create a directory there ({e})") from e
    _log(config, f"{ds.name}: {ds.task}, {ds.x_train.shape[0]} train / {ds.x_test.shape[0]} test, "
                 f"{len(data.loo)} LOO points, {len(data.test_idx)} test points, {int(data.flipped.sum())} flipped labels")

    t = time.perf_counter()
    model, final_key, final_lr, final_info = _final_model(config, data, stages)
    timings["final_model"] = time.perf_counter() - t
    _log(config, "final model: " + ", ".join(f"{k} {v:.4g}" for k, v in final_info.items()
                                              if k.startswith(("train_", "test_"))))

    dev = torch.device(config.device)
    train = (ds.x_train.to(dev), data.y_train.to(dev))
    test_sel = torch.from_numpy(data.test_idx)
    test = (ds.x_test[test_sel].to(dev), ds.y_test[test_sel].to(dev))

    t = time.perf_counter()
    method_recs = _method_stage(config, data, model, final_key, methods, stages, train, test)
    timings["methods"] = time.perf_counter() - t

    t = time.perf_counter()
    result, further_lr, seeds = _gold_stage(config, data, model, final_key, final_lr, stages, train, test)
    timings["gold"] = time.perf_counter() - t

    # ---- metrics
    t = time.perf_counter()
    n_test = len(data.test_idx)
    eval_points = np.asarray(result.eval_points)
    gold_all = api.gold(result, config.adjust).double().cpu().numpy()   # [E, Z (+S), S]
    gold = gold_all[:, :n_test]
    curves, scores, summary = {}, {}, {}
    with_self = bool(data.flipped.any())
    gold_info = {}
    if with_self:
        gold_self = np.diagonal(gold_all[:, n_test:], axis1=1, axis2=2)  # [E, S]: τ_t(z_i, i)
        keep = eval_points != 0
        auc = np.array([metrics.mislabel_auc(gold_self[k], data.flipped) for k in np.nonzero(keep)[0]])
        gold_info["mislabel_auc"] = {"eval_points": eval_points[keep], "auc": auc,
                                     "first": auc[0], "peak": np.nanmax(auc) if np.isfinite(auc).any() else None,
                                     "peak_at": eval_points[keep][int(np.nanargmax(auc))] if np.isfinite(auc).any() else None}

    group_golds = {}  # one gold per seed group, shared by every method's seed-count study

    def gold_for_seeds(group):
        key = tuple(group)
        if key not in group_golds:
            group_golds[key] = api.gold(result, config.adjust, list(group)).double().cpu().numpy()[:, :n_test]
        return group_golds[key]

    for m, rec in method_recs.items():
        if rec["error"] is not None:
            summary[m] = {"error": rec["error"]}
            continue
        s = rec["scores"].numpy()
        scores[m] = s
        c = metrics.similarity_curves(gold, s, eval_points)
        curves[m] = c
        pc = metrics.peak(c["cosine_mean"], c["cosine_sem"], c["eval_points"])
        ps = metrics.peak(c["spearman_mean"], c["spearman_sem"], c["eval_points"])
        entry = {"seconds": rec["seconds"], "self_seconds": rec["self_seconds"], "cached": False,
                 "options": rec["options"],
                 "peak_cosine": pc, "peak_spearman": ps,
                 "cosine_first": {"value": c["cosine_mean"][0], "sem": c["cosine_sem"][0], "at": c["eval_points"][0]},
                 "cosine_last": {"value": c["cosine_mean"][-1], "sem": c["cosine_sem"][-1], "at": c["eval_points"][-1]},
                 "undefined_cosines": int(c["cosine"].size - c["cosine_n"].sum()),
                 "seed_study": metrics.seed_count_study(gold_for_seeds, len(seeds), s, eval_points)}
        if with_self:
            entry["mislabel_auc"] = metrics.mislabel_auc(rec["self"].numpy(), data.flipped)
        summary[m] = entry
    for entry in stages.log:
        if entry["stage"].startswith("method:") and entry["stage"][7:] in summary:
            summary[entry["stage"][7:]]["cached"] = entry["cached"]
    timings["metrics"] = time.perf_counter() - t

    # ---- artifacts
    t = time.perf_counter()
    out = config.out_dir
    results = {
        "config": dataclasses.asdict(config),
        "versions": _versions(),
        "data": {**ds.describe(), "loo_indices": data.loo, "test_indices": data.test_idx,
                 "flipped_loo_indices": data.loo[data.flipped]},
        "final_model": final_info,
        "further_training": {"optimizer": config.optimizer, "lr": further_lr, "epochs": config.epochs,
                             "batch_size": config.batch_size, "momentum": config.momentum,
                             "weight_decay": config.weight_decay, "mode": config.mode, "adjust": config.adjust,
                             "seeds": seeds, "n_models": (len(data.loo) + 1) * len(seeds),
                             "eval_points": eval_points},
        "methods": summary,
        "peak_cosine": {m: e["peak_cosine"]["value"] for m, e in summary.items() if "peak_cosine" in e},
        "gold": gold_info,
        "stages": stages.log,
        "timings": timings,
    }
    artifacts = _write_artifacts(out, results, gold, eval_points, scores, method_recs, data, curves,
                                 gold_all[:, n_test:] if with_self else None, config)
    timings["artifacts"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - t_start
    results["artifacts"] = artifacts
    with open(os.path.join(out, "results.json"), "w") as fh:
        json.dump(_jsonable(results), fh, indent=2)
    return StudyResult(config, out, _jsonable(results), gold, eval_points, scores, curves, artifacts)


_ARTIFACTS = ("results.json", "scores.npz", "curves.csv", "seeds.csv", "cosine.png", "spearman.png", "seeds.png",
              "mislabel.png")  # every file _write_artifacts may write


def _write_artifacts(out, results, gold, eval_points, scores, method_recs, data, curves, gold_self_block, config):
    arrays = {"gold": gold, "eval_points": eval_points, "loo_indices": data.loo, "test_indices": data.test_idx}
    for m, s in scores.items():
        arrays[f"scores_{m}"] = s
        if "self" in method_recs[m]:
            arrays[f"self_{m}"] = method_recs[m]["self"].numpy()
    if gold_self_block is not None:
        arrays["gold_self"] = np.diagonal(gold_self_block, axis1=1, axis2=2)
        arrays["flipped"] = data.flipped
    np.savez_compressed(os.path.join(out, "scores.npz"), **arrays)
    files = ["results.json", "scores.npz", "curves.csv", "seeds.csv"]

    with open(os.path.join(out, "curves.csv"), "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["method", "metric", "eval_point", "mean", "sem", "n"])
        for m, c in curves.items():
            for metric in ("cosine", "spearman"):
                for k, tp in enumerate(c["eval_points"]):
                    w.writerow([m, metric, int(tp), repr(float(c[f"{metric}_mean"][k])),
                                repr(float(c[f"{metric}_sem"][k])), int(c[f"{metric}_n"][k])])
        auc = results["gold"].get("mislabel_auc")
        if auc is not None:
            for tp, v in zip(auc["eval_points"], auc["auc"]):
                w.writerow(["gold", "mislabel_auc", int(tp), repr(float(v)), "", len(data.flipped)])

    with open(os.path.join(out, "seeds.csv"), "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["method", "n_seeds", "n_groups", "peak_cosine", "sem", "at"])
        for m, e in results["methods"].items():
            for row in e.get("seed_study", []):
                w.writerow([m, row["n_seeds"], row["n_groups"], repr(row["peak"]), repr(row["sem"]), row["at"]])

    if config.plots and curves:
        from . import plots

        files += plots.write_all(out, results, curves, title=f"{results['data']['name']} ({config.optimizer}, "
                                 f"{len(results['further_training']['seeds'])} seeds, adjust={config.adjust})")
    for name in set(_ARTIFACTS) - set(files):  # an earlier study's, in a reused out directory
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(out, name))
    return files


def _fmt(entry, key="value"):
    v = entry.get(key) if isinstance(entry, dict) else entry
    return "—" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.3f}"


def summary_table(results: dict) -> str:
    """The run's summary: per method its time, peak cosine ± SEM and where, cosine after the first
    evaluation, peak Spearman and (with flipped labels) the mislabel-detection AUC."""
    with_auc = bool(results.get("gold"))
    head = ["method", "time s", "peak cos", "± sem", "at", "cos@first", "peak ρ"] + (["AUC"] if with_auc else [])
    rows = []
    for m, e in results["methods"].items():
        if "error" in e:
            rows.append([m, "failed: " + e["error"][:60]] + [""] * (len(head) - 2))
            continue
        secs = (e["seconds"] or 0) + (e["self_seconds"] or 0)
        row = [m, f"{secs:.2f}" + (" (c)" if e.get("cached") else ""), _fmt(e["peak_cosine"]),
               _fmt(e["peak_cosine"], "sem"), str(e["peak_cosine"]["at"]), _fmt(e["cosine_first"]),
               _fmt(e["peak_spearman"])]
        if with_auc:
            row.append(_fmt(e.get("mislabel_auc")))
        rows.append(row)
    if with_auc:
        g = results["gold"]["mislabel_auc"]
        rows.append(["gold (self)", "", "", "", "", "", "", f"{_fmt(g['first'])} @1st, peak {_fmt(g['peak'])}"])
    widths = [max(len(str(r[k])) for r in rows + [head]) for k in range(len(head))]
    line = lambda r: "  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip()
    ft = results["further_training"]
    d = results["data"]
    title = (f"{d['name']}: {d['task']}, {ft['n_models']} further-trained models ({len(ft['seeds'])} seeds × "
             f"{len(d['loo_indices'])} + 1), {ft['epochs']} epochs {ft['optimizer']} lr {ft['lr']:g}, adjust={ft['adjust']}; "
             f"cosine vs gold over {len(d['test_indices'])} test points")
    sep = "-" * len(line(head))
    tm = results["timings"]
    stages = ", ".join(f"{k} {v:.1f}s" for k, v in tm.items())
    return "\n".join([title, sep, line(head), sep, *map(line, rows), sep, f"time: {stages}"])
