"""Data sets for studies: scikit-learn's bundled sets and user CSV files, with the paper's
preprocessing (Appendix D.1): ``train_test_split(test_size=0.1, random_state=0)``, features — and
regression targets — standardized with the training split's mean and standard deviation.

Embedded sets (no download, shipped inside scikit-learn):

- ``diabetes``: regression, 442 × 10 (397 train / 45 test);
- ``breast_cancer``: binary classification, 569 × 30 (512 / 57);
- ``digits``: 8×8 grey images, 10 classes, 1797 samples (1617 / 180), returned as ``[n, 1, 8, 8]``.
"""
from __future__ import annotations

import csv
import math
import os
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

__all__ = ["EMBEDDED_DATASETS", "Dataset", "DatasetError", "load_embedded", "load_csv", "split_standardize"]

EMBEDDED_DATASETS = ("diabetes", "breast_cancer", "digits")
TEST_SIZE = 0.1
SPLIT_SEED = 0


class DatasetError(ValueError):
    """Bad data-set input from the user (unknown name, unreadable CSV, missing column, …)."""


@dataclass
class Dataset:
    """A split, preprocessed data set. ``x_*`` float tensors (``[n, d]``, or ``[n, 1, 8, 8]`` for
    images); ``y_*`` float ``[n]`` (regression, standardized) or int64 class indices ``[n]``."""
    name: str
    task: str  # "regression" | "classification"
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    n_classes: int | None = None
    feature_names: list[str] = field(default_factory=list)
    target_name: str = "target"
    # training statistics used for standardization (to map predictions back to target units)
    x_mean: np.ndarray | None = None
    x_std: np.ndarray | None = None
    y_mean: float | None = None
    y_std: float | None = None

    @property
    def n_features(self) -> int:
        return int(np.prod(self.x_train.shape[1:]))

    @property
    def n_outputs(self) -> int:
        return 1 if self.task == "regression" else int(self.n_classes)

    @property
    def is_image(self) -> bool:
        return self.x_train.dim() == 4

    def describe(self) -> dict:
        return {"name": self.name, "task": self.task, "n_train": int(self.x_train.shape[0]),
                "n_test": int(self.x_test.shape[0]), "input_shape": list(self.x_train.shape[1:]),
                "n_classes": self.n_classes, "target": self.target_name}


def _standardize(train: np.ndarray, *others: np.ndarray):
    """(train - mean) / std with the training statistics; constant columns keep std 1 (not 0/0)."""
    mean = train.mean(0)
    std = train.std(0)
    std = np.where(std > 0, std, 1.0)
    return mean, std, [(a - mean) / std for a in (train,) + others]


def split_standardize(name: str, X: np.ndarray, y: np.ndarray, task: str, *,
                      feature_names: Sequence[str] = (), target_name: str = "target",
                      image_shape: tuple[int, ...] | None = None, dtype=torch.float32) -> Dataset:
    """The paper's split and standardization of a feature matrix ``X [n, d]`` and targets ``y [n]``."""
    from sklearn.model_selection import train_test_split

    if task not in ("regression", "classification"):
        raise DatasetError(f"task: expected 'regression' or 'classification', got {task!r}")
    X = np.asarray(X, dtype=np.float64)
    if X.ndim != 2 or X.shape[0] != len(y):
        raise DatasetError(f"X: expected [n, d] with n = len(y) = {len(y)}, got shape {X.shape}")
    if X.shape[0] < 20:
        raise DatasetError(f"data: expected at least 20 rows for a 90/10 split, got {X.shape[0]}")
    x_tr, x_te, y_tr, y_te = train_test_split(X, np.asarray(y), test_size=TEST_SIZE, random_state=SPLIT_SEED)
    x_mean, x_std, (x_tr, x_te) = _standardize(x_tr, x_te)
    shape = (-1,) + tuple(image_shape) if image_shape else (-1, X.shape[1])
    kw = dict(x_train=torch.tensor(x_tr, dtype=dtype).reshape(shape),
              x_test=torch.tensor(x_te, dtype=dtype).reshape(shape),
              feature_names=list(feature_names), target_name=target_name, x_mean=x_mean, x_std=x_std)
    if task == "regression":
        if not np.ptp(y_tr.astype(np.float64)) > 0:
            raise DatasetError(f"target {target_name!r}: constant on the training split ({float(y_tr[0])!r}); "
                               "there is nothing to fit or attribute")
        y_mean, y_std, (y_tr, y_te) = _standardize(y_tr.astype(np.float64), y_te.astype(np.float64))
        return Dataset(name, task, y_train=torch.tensor(y_tr, dtype=dtype),
                       y_test=torch.tensor(y_te, dtype=dtype), y_mean=float(y_mean), y_std=float(y_std), **kw)
    classes = np.unique(np.concatenate([y_tr, y_te]))
    if len(classes) < 2:
        raise DatasetError(f"target {target_name!r}: classification needs at least 2 classes, got {len(classes)}")
    # class labels (any sortable values) → indices 0..C-1
    to_index = {c: k for k, c in enumerate(classes.tolist())}
    y_tr = np.array([to_index[c] for c in y_tr.tolist()], dtype=np.int64)
    y_te = np.array([to_index[c] for c in y_te.tolist()], dtype=np.int64)
    return Dataset(name, task, y_train=torch.from_numpy(y_tr), y_test=torch.from_numpy(y_te),
                   n_classes=len(classes), **kw)


def load_embedded(name: str, dtype=torch.float32) -> Dataset:
    """One of :data:`EMBEDDED_DATASETS`, split and standardized."""
    from sklearn import datasets as skd

    if name == "diabetes":
        d = skd.load_diabetes(scaled=False)
        return split_standardize(name, d.data, d.target, "regression", feature_names=d.feature_names,
                                 target_name="disease progression", dtype=dtype)
    if name == "breast_cancer":
        d = skd.load_breast_cancer()
        return split_standardize(name, d.data, d.target, "classification",
                                 feature_names=list(d.feature_names), target_name="diagnosis", dtype=dtype)
    if name == "digits":
        d = skd.load_digits()
        return split_standardize(name, d.data, d.target, "classification", feature_names=list(d.feature_names),
                                 target_name="digit", image_shape=(1, 8, 8), dtype=dtype)
    raise DatasetError(f"dataset: expected one of {list(EMBEDDED_DATASETS)}, got {name!r}")


def _parse_float(text: str) -> float:
    v = float(text)
    if not math.isfinite(v):
        raise ValueError(text)
    return v


def _number(text: str) -> float | None:
    try:
        return _parse_float(text)
    except ValueError:
        return None


_MISSING = {"nan", "na", "n/a", "null", "none", "?"}  # spellings of a missing label


def load_csv(path: str | os.PathLike, target: str, drop: Sequence[str] = (), task: str = "regression",
             dtype=torch.float32) -> Dataset:
    """A CSV file with a header row: every column except ``target`` and ``drop`` is a numeric
    feature. ``task="classification"`` maps the target's distinct values (integers, "1.0" included, or text) to
    class indices in sorted order; ``"regression"`` needs a numeric target."""
    path = os.fspath(path)
    if task not in ("regression", "classification"):
        raise DatasetError(f"task: expected 'regression' or 'classification', got {task!r}")
    if not os.path.isfile(path):
        raise DatasetError(f"csv: no such file {path!r}")
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            rows = [r for r in csv.reader(fh) if r and any(c.strip() for c in r)]
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DatasetError(f"csv: cannot read {path!r}: {e}") from None
    if len(rows) < 2:
        raise DatasetError(f"csv: expected a header row and data rows in {path!r}, got {len(rows)} row(s)")
    header = [h.strip() for h in rows[0]]
    dup = sorted({h for h in header if header.count(h) > 1})
    if dup:  # columns are found by name: a repeated one would silently read the last copy twice
        raise DatasetError(f"csv: repeated column name(s) {dup} in the header of {path!r}")
    for col in [target, *drop]:
        if col not in header:
            raise DatasetError(f"csv: column {col!r} not in {path!r} (columns: {', '.join(header)})")
    if target in drop:
        raise DatasetError(f"drop: the target column {target!r} cannot be dropped")
    features = [h for h in header if h != target and h not in drop]
    if not features:
        raise DatasetError(f"csv: no feature columns left in {path!r} after removing the target and --drop")
    col = {h: k for k, h in enumerate(header)}
    X = np.empty((len(rows) - 1, len(features)))
    y = []
    for r, row in enumerate(rows[1:], start=2):
        if len(row) != len(header):
            raise DatasetError(f"csv: line {r} of {path!r} has {len(row)} fields, expected {len(header)}")
        for k, h in enumerate(features):
            try:
                X[r - 2, k] = _parse_float(row[col[h]])
            except ValueError:
                raise DatasetError(f"csv: column {h!r}, line {r}: expected a finite number, got "
                                   f"{row[col[h]]!r} (drop non-numeric columns with --drop)") from None
        value = row[col[target]].strip()
        if task == "regression":
            try:
                value = _parse_float(value)
            except ValueError:
                raise DatasetError(f"csv: target {target!r}, line {r}: expected a finite number for regression, "
                                   f"got {value!r} (use --task classification for labels)") from None
        elif value == "" or value.lower() in _MISSING:
            raise DatasetError(f"csv: target {target!r}, line {r}: missing label ({value!r})")
        y.append(value)
    y = np.array(y)
    if task == "classification":
        values = [_number(v) for v in y]
        numeric = [k for k, v in enumerate(values) if v is not None]
        frac = [k for k in numeric if values[k] != round(values[k])]
        if frac and 2 * len(numeric) >= len(y):  # a continuous target would become one class per value
            raise DatasetError(f"csv: target {target!r}: numeric class labels must be integers, got "
                               f"{str(y[frac[0]])!r} (use --task regression, or text labels)")
        if len(numeric) == len(y):  # numeric labels sort numerically
            y = np.array(values)
        else:  # mixed with text: a number is one class however it is written ("1", "1.0"; "1.5", "1.50")
            y = np.array([v if values[k] is None else str(int(values[k])) if values[k] == int(values[k])
                          else repr(values[k]) for k, v in enumerate(y.tolist())])
    name = os.path.splitext(os.path.basename(path))[0]
    return split_standardize(name, X, y, task, feature_names=features, target_name=target, dtype=dtype)
