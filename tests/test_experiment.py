"""End-to-end studies on the embedded sets: every artifact, sane values, stage caching."""
import csv
import json
import math

import numpy as np
import pytest
from scipy.spatial import distance

import fimoda_kernels as fk
from fimoda_kernels import experiment
from fimoda_kernels.experiment import StudyConfig, StudyConfigError, run_study

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# small final-model training keeps the test quick; the study itself is the issue's small setting
FINAL_EPOCHS = {"diabetes": 40, "breast_cancer": 30, "digits": 4}


def _config(tmp_path, dataset, methods=("grad_dot", "grad_cos"), **kw):
    kw = {"seeds": 2, "epochs": 3, "n_loo": 10, "final_epochs": FINAL_EPOCHS[dataset], "progress": False, **kw}
    return StudyConfig(dataset=dataset, methods=methods, out=str(tmp_path / dataset), **kw)


def _strict_json(path):
    def no_nan(token):
        raise AssertionError(f"non-standard JSON constant {token} in {path}")
    with open(path) as fh:
        return json.load(fh, parse_constant=no_nan)


def _check_study(res, dataset, methods):
    out = res.out_dir
    results = _strict_json(f"{out}/results.json")
    classification = dataset != "diabetes"
    expected = ["results.json", "scores.npz", "curves.csv", "seeds.csv", "cosine.png", "spearman.png", "seeds.png"]
    expected += ["mislabel.png"] if classification else []
    assert results["artifacts"] == expected
    for name in expected:
        if name.endswith(".png"):
            with open(f"{out}/{name}", "rb") as fh:
                data = fh.read()
            assert data[:8] == PNG_MAGIC and len(data) > 5000, name

    assert results["config"]["dataset"] == dataset and results["config"]["seeds"] == 2
    for k in ("fimoda_kernels", "torch", "numpy", "python"):
        assert results["versions"][k]
    assert set(results["timings"]) == {"data", "final_model", "methods", "gold", "metrics", "artifacts", "total"}
    assert all(v >= 0 for v in results["timings"].values())
    ft = results["further_training"]
    assert ft["eval_points"] == [0, 1, 2, 3] and ft["seeds"] == [1, 2] and ft["n_models"] == 22
    assert ft["lr"] == pytest.approx(results["final_model"]["lr"] / 10)
    assert list(results["methods"]) == list(methods)

    z = len(results["data"]["test_indices"])
    npz = np.load(f"{out}/scores.npz")
    gold = npz["gold"]
    assert gold.shape == (4, z, 10) and np.isfinite(gold).all()
    # t = 0: every model is θ*, the mean-adjusted gold is 0 up to float32 rounding of the O(1) losses
    assert np.abs(gold[0]).max() < 1e-5
    assert np.abs(gold[1:]).max() > 0
    np.testing.assert_allclose(gold.sum(axis=2), 0.0, atol=2e-5)  # eq. 13 centres over S (float32 losses)
    np.testing.assert_array_equal(npz["loo_indices"], results["data"]["loo_indices"])

    with open(f"{out}/curves.csv") as fh:
        rows = list(csv.DictReader(fh))
    for m in methods:
        e = results["methods"][m]
        assert "error" not in e, e
        s = npz[f"scores_{m}"]
        assert s.shape == (10, z) and np.isfinite(s).all() and np.abs(s).max() > 0
        pk = e["peak_cosine"]
        assert -1 <= pk["value"] <= 1 and pk["at"] in (1, 2, 3) and pk["sem"] >= 0
        assert results["peak_cosine"][m] == pk["value"]
        assert -1 <= e["peak_spearman"]["value"] <= 1
        # the curves in the CSV are the cosine of the stored gold and scores (recomputed with scipy)
        cos_rows = [r for r in rows if r["method"] == m and r["metric"] == "cosine"]
        assert [int(r["eval_point"]) for r in cos_rows] == [1, 2, 3]
        for r in cos_rows:
            t = int(r["eval_point"])
            direct = np.mean([1 - distance.cosine(gold[t, k], s[:, k]) for k in range(z)])
            assert float(r["mean"]) == pytest.approx(direct, abs=1e-9)
            assert int(r["n"]) == z
        assert max(float(r["mean"]) for r in cos_rows) == pytest.approx(pk["value"])
        assert len([r for r in rows if r["method"] == m and r["metric"] == "spearman"]) == 3
        assert [row["n_seeds"] for row in e["seed_study"]] == [1, 2]
        assert e["seed_study"][-1]["peak"] == pytest.approx(pk["value"])
        assert e["seconds"] > 0
        if classification:
            assert 0 <= e["mislabel_auc"] <= 1 and npz[f"self_{m}"].shape == (10,)

    if classification:
        assert len(results["data"]["flipped_loo_indices"]) == 2  # 20 % of 10
        assert npz["flipped"].sum() == 2 and npz["gold_self"].shape == (4, 10)
        auc = results["gold"]["mislabel_auc"]
        assert auc["eval_points"] == [1, 2, 3] and all(0 <= a <= 1 for a in auc["auc"])
        assert len([r for r in rows if r["method"] == "gold" and r["metric"] == "mislabel_auc"]) == 3
        acc = results["final_model"]["train_accuracy"]
        assert 0.5 < acc <= 1
    else:
        assert results["gold"] == {} and "flipped" not in npz
        assert results["final_model"]["train_r2"] > 0
    table = res.table()
    assert all(m in table for m in methods)
    return results


@pytest.mark.parametrize("dataset", ["diabetes", "breast_cancer", "digits"])
def test_small_study_every_artifact(tmp_path, dataset):
    methods = ("grad_dot", "grad_cos")
    # digits: a seeded subset of its 180 test points keeps the CNN study quick (and tests n_test)
    res = run_study(_config(tmp_path, dataset, methods, **({"n_test": 40} if dataset == "digits" else {})))
    results = _check_study(res, dataset, methods)
    if dataset == "digits":
        idx = results["data"]["test_indices"]
        assert len(idx) == 40 and idx == sorted(set(idx)) and max(idx) < 180


def test_all_methods(tmp_path):
    # looser solves than the paper's defaults: this checks the runner's plumbing, not the solvers; a
    # regression set, because self-influence (classification) solves for every training point
    cheap = {"lissa": {"depth": 50}, "lissa_h": {"depth": 50}, "cg": {"tol": 1e-4}, "generalized_if": {"tol": 1e-4}}
    res = run_study(_config(tmp_path, "diabetes", "all", method_options=cheap))
    results = _check_study(res, "diabetes", fk.METHODS)
    assert set(results["peak_cosine"]) == set(fk.METHODS)


def test_rerun_with_another_method_reuses_stages(tmp_path, monkeypatch):
    first = run_study(_config(tmp_path, "diabetes", ("grad_dot",)))
    stages = {s["stage"]: s["cached"] for s in first.results["stages"]}
    assert stages == {"final_model": False, "method:grad_dot": False, "gold": False}

    second = run_study(_config(tmp_path, "diabetes", ("grad_dot", "grad_cos")))
    stages = {s["stage"]: s for s in second.results["stages"]}
    assert stages["final_model"]["cached"] and stages["gold"]["cached"] and stages["method:grad_dot"]["cached"]
    assert not stages["method:grad_cos"]["cached"]
    assert stages["gold"]["key"] == {s["stage"]: s for s in first.results["stages"]}["gold"]["key"]
    np.testing.assert_array_equal(first.gold, second.gold)
    assert second.results["methods"]["grad_dot"]["peak_cosine"] == first.results["methods"]["grad_dot"]["peak_cosine"]

    # what the gold depends on changes its key: more further-training epochs retrain only that stage
    third = run_study(_config(tmp_path, "diabetes", ("grad_dot",), epochs=4))
    stages = {s["stage"]: s["cached"] for s in third.results["stages"]}
    assert stages == {"final_model": True, "method:grad_dot": True, "gold": False}
    assert third.gold.shape[0] == 5

    # another build of the library never reuses a stage
    monkeypatch.setattr(experiment, "_code_digest", lambda: "another build")
    fourth = run_study(_config(tmp_path, "diabetes", ("grad_dot",), epochs=4))
    assert not any(s["cached"] for s in fourth.results["stages"])


def test_config_errors(tmp_path):
    with pytest.raises(StudyConfigError, match="seeds"):
        StudyConfig(seeds=0)
    with pytest.raises(StudyConfigError, match="dataset"):
        StudyConfig(dataset="iris")
    with pytest.raises(StudyConfigError, match="target"):
        StudyConfig(csv="x.csv")
    with pytest.raises(StudyConfigError, match="mislabel_fraction"):
        StudyConfig(mislabel_fraction=1.0)
    with pytest.raises(StudyConfigError, match="n_loo"):
        run_study(StudyConfig(n_loo=1000, out=str(tmp_path / "x"), progress=False))
    with pytest.raises(StudyConfigError, match="flips 0 labels"):
        run_study(StudyConfig(dataset="breast_cancer", n_loo=2, out=str(tmp_path / "y"), progress=False))
    with pytest.raises(TypeError, match="config"):
        run_study({"dataset": "diabetes"})
    # method options are checked before anything trains, also with methods="all"
    for methods, options, match in [("all", {"lisa": {"depth": 5}}, r"unknown method\(s\) \['lisa'\]"),
                                    (("grad_dot",), {"lissa": {"depth": 5}}, "does not run"),
                                    (("cg",), {"cg": {"nosuch": 5}}, r"method_options\['cg'\]: cg: unknown option"),
                                    (("cg",), {"cg": {"damping": -1.0}}, r"method_options\['cg'\]: damping")]:
        with pytest.raises(StudyConfigError, match=match):
            StudyConfig(methods=methods, method_options=options, out=str(tmp_path / "z")).resolved_methods()
    assert math.isclose(StudyConfig().mislabel_fraction, 0.2)
