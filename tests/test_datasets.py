"""Data-set loaders: the paper's split and standardization, embedded sets, CSV files."""
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn import datasets as skd
from sklearn.model_selection import train_test_split

from fimoda_kernels.datasets import DatasetError, load_csv, load_embedded, split_standardize

# the reference CSVs live beside the repository (../shared/data); FIMODA_SHARED_DATA overrides
SHARED_DATA = Path(os.environ.get("FIMODA_SHARED_DATA",
                                  Path(__file__).resolve().parents[1].parent / "shared" / "data"))


def _shared(name):
    path = SHARED_DATA / name
    if not path.is_file():
        pytest.skip(f"{path} absent")
    return path


def _check_standardized(x, y=None):
    x = x.reshape(x.shape[0], -1).double()
    sd = x.std(0, unbiased=False)
    live = sd > 0
    torch.testing.assert_close(x.mean(0), torch.zeros_like(x.mean(0)), atol=1e-5, rtol=0)
    torch.testing.assert_close(sd[live], torch.ones_like(sd[live]), atol=1e-5, rtol=0)
    if y is not None:
        assert abs(float(y.double().mean())) < 1e-5 and abs(float(y.double().std(unbiased=False)) - 1) < 1e-5


@pytest.mark.parametrize("name, n_train, n_test, shape, classes", [
    ("diabetes", 397, 45, (10,), None),
    ("breast_cancer", 512, 57, (30,), 2),
    ("digits", 1617, 180, (1, 8, 8), 10),
])
def test_embedded_sets(name, n_train, n_test, shape, classes):
    ds = load_embedded(name)
    assert ds.x_train.shape == (n_train, *shape) and ds.x_test.shape == (n_test, *shape)
    assert ds.x_train.dtype == torch.float32
    assert ds.n_classes == classes
    if classes is None:
        assert ds.task == "regression" and ds.y_train.dtype == torch.float32
        _check_standardized(ds.x_train, ds.y_train)
    else:
        assert ds.task == "classification" and ds.y_train.dtype == torch.int64
        assert set(ds.y_train.tolist()) == set(range(classes))
        _check_standardized(ds.x_train)
    assert bool(torch.isfinite(ds.x_test).all())


def test_split_is_the_papers():
    """Rows and order equal train_test_split(test_size=0.1, random_state=0); test rows use the
    training statistics."""
    raw = skd.load_diabetes(scaled=False)
    x_tr, x_te, y_tr, y_te = train_test_split(raw.data, raw.target, test_size=0.1, random_state=0)
    ds = load_embedded("diabetes", dtype=torch.float64)
    mu, sd = x_tr.mean(0), x_tr.std(0)
    np.testing.assert_allclose(ds.x_train.numpy(), (x_tr - mu) / sd, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(ds.x_test.numpy(), (x_te - mu) / sd, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(ds.y_test.numpy(), (y_te - y_tr.mean()) / y_tr.std(), rtol=1e-12)
    assert ds.y_mean == pytest.approx(y_tr.mean()) and ds.y_std == pytest.approx(y_tr.std())


def test_constant_column_stays_finite():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(50, 3))
    X[:, 1] = 7.0
    ds = split_standardize("t", X, rng.normal(size=50), "regression")
    assert bool(torch.isfinite(ds.x_train).all()) and float(ds.x_train[:, 1].abs().max()) == 0.0


def test_unknown_embedded_set():
    with pytest.raises(DatasetError, match="dataset: expected one of"):
        load_embedded("iris")


def test_energy_csv():
    ds = load_csv(_shared("energy.csv"), "Y1", drop=["Y2"])
    assert ds.x_train.shape == (691, 8) and ds.x_test.shape == (77, 8)
    assert ds.feature_names == [f"X{k}" for k in range(1, 9)] and ds.target_name == "Y1"
    _check_standardized(ds.x_train, ds.y_train)


def test_concrete_csv():
    ds = load_csv(_shared("concrete.csv"), "Concrete compressive strength")
    assert ds.x_train.shape == (927, 8) and ds.x_test.shape == (103, 8)
    assert "Age (day)" in ds.feature_names
    _check_standardized(ds.x_train, ds.y_train)


def test_csv_errors(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("a,b,label\n" + "".join(f"{k},{k % 3},{'yes' if k % 2 else 'no'}\n" for k in range(40)))
    with pytest.raises(DatasetError, match="column 'nope' not in"):
        load_csv(path, "nope")
    with pytest.raises(DatasetError, match="column 'zz' not in"):
        load_csv(path, "label", drop=["zz"], task="classification")
    with pytest.raises(DatasetError, match="expected a finite number for regression"):
        load_csv(path, "label")
    with pytest.raises(DatasetError, match="no such file"):
        load_csv(tmp_path / "missing.csv", "label")
    with pytest.raises(DatasetError, match="column 'label'.*drop non-numeric"):
        load_csv(path, "a")
    with pytest.raises(DatasetError, match="cannot be dropped"):
        load_csv(path, "label", drop=["label"], task="classification")
    twice = tmp_path / "twice.csv"
    twice.write_text("a,a,y\n" + "".join(f"{k},{-k},{k % 2}\n" for k in range(20)))
    with pytest.raises(DatasetError, match=r"repeated column name\(s\) \['a'\]"):
        load_csv(twice, "y")
    ds = load_csv(path, "label", task="classification")
    assert ds.n_classes == 2 and ds.x_train.shape == (36, 2)
    # labels map to indices in sorted order: "no" → 0, "yes" → 1
    raw_a = np.arange(40.0)
    _, _, _, y_te = train_test_split(raw_a, raw_a % 2, test_size=0.1, random_state=0)
    assert ds.y_test.tolist() == y_te.astype(int).tolist()


def test_csv_labels_mixing_numbers_and_text(tmp_path):
    """With one text label among numeric ones, "1" and "1.0" stay one class."""
    path = tmp_path / "d.csv"
    labels = ["1", "1.0", "2", "other"]
    path.write_text("a,b,y\n" + "".join(f"{k},{k % 3},{labels[k % 4]}\n" for k in range(40)))
    assert load_csv(path, "y", task="classification").n_classes == 3


def test_constant_regression_target_refused(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("a,b,y\n" + "".join(f"{k},{k % 3},2.5\n" for k in range(40)))
    with pytest.raises(DatasetError, match="target 'y': constant on the training split"):
        load_csv(path, "y")


def test_csv_fractional_labels_among_text_stay_apart(tmp_path):
    path = tmp_path / "d.csv"
    labels = ["cat", "dog", "cat", "dog", "1.2", "1.7", "1.20"]
    path.write_text("a,b,y\n" + "".join(f"{k},{k % 3},{labels[k % 7]}\n" for k in range(42)))
    assert load_csv(path, "y", task="classification").n_classes == 4  # "1.2" and "1.20" are one class
