"""``fimoda run`` on bad input: one line on stderr, exit status 2, no traceback; a failed method: status 1."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fimoda_kernels.cli import main

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def csv_file(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("a,b,y\n" + "".join(f"{k},{(k * 7) % 5},{k * 0.5}\n" for k in range(40)))
    return path


def _bad(capsys, argv, match):
    code = main(argv)
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert code == 2, err
    assert "\n" not in err, err
    assert err.startswith("fimoda: error:") and match in err, err
    assert "Traceback" not in captured.err + captured.out
    assert captured.out == ""


@pytest.mark.parametrize("argv, match", [
    (["run", "--dataset", "mnist"], "invalid choice: 'mnist'"),
    (["run", "--seeds", "0"], "--seeds: expected a positive integer, got '0'"),
    (["run", "--seeds", "ten"], "expected a positive integer, got 'ten'"),
    (["run", "--epochs", "-1"], "--epochs"),
    (["run", "--further-lr", "0"], "--further-lr: expected a positive number"),
    (["run", "--mislabel-fraction", "1.5"], "expected a number in [0, 1)"),
    (["run", "--optimizer", "rmsprop"], "invalid choice: 'rmsprop'"),
    (["run", "--mode", "drop"], "invalid choice: 'drop'"),
    (["run", "--adjust", "median"], "invalid choice: 'median'"),
    (["run", "--dataset", "digits", "--csv", "x.csv"], "not allowed with argument"),
    (["run", "--target", "y"], "--target/--drop/--task apply to --csv only"),
    (["run", "--task", "classification"], "--target/--drop/--task apply to --csv only"),
    (["run", "--methods", "all,grad_dot"], "'all' selects every method; give it alone"),
    (["run", "--seed", str(2**64)], "seed: expected an integer <="),
    (["run", "--bogus"], "unrecognized arguments: --bogus"),
    (["run", "--device", "tpu"], "device:"),
    (["run", "--option", "lissa.depth"], "expected METHOD.NAME=VALUE, got 'lissa.depth'"),
    (["walk"], "invalid choice: 'walk'"),
    ([], "expected a command"),
])
def test_bad_arguments(capsys, argv, match):
    _bad(capsys, argv, match)


def test_bad_csv_input(capsys, csv_file, tmp_path):
    out = str(tmp_path / "out")
    _bad(capsys, ["run", "--csv", str(csv_file)], "--csv needs --target")
    _bad(capsys, ["run", "--csv", str(csv_file), "--target", "price", "--out", out], "column 'price' not in")
    _bad(capsys, ["run", "--csv", str(csv_file), "--target", "y", "--drop", "c", "--out", out], "column 'c' not in")
    _bad(capsys, ["run", "--csv", str(tmp_path / "none.csv"), "--target", "y", "--out", out], "no such file")
    _bad(capsys, ["run", "--csv", str(csv_file), "--target", "y", "--n-loo", "37", "--out", out],
         "n_loo: expected at most the 36 training points")


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")
def test_cuda_without_device(capsys):
    _bad(capsys, ["run", "--device", "cuda"], "no CUDA device")


def test_unknown_method(capsys, tmp_path):
    _bad(capsys, ["run", "--methods", "grad_dot,magic", "--out", str(tmp_path / "o"), "--n-loo", "5"],
         "methods: unknown 'magic'")


def test_method_options_reach_the_config(monkeypatch):
    import fimoda_kernels.experiment as experiment

    seen = {}

    def fake_run_study(config):
        seen["config"] = config
        raise experiment.StudyConfigError("stop here")

    monkeypatch.setattr(experiment, "run_study", fake_run_study)
    assert main(["run", "--option", "lissa.depth=1000", "--option", "generalized_if.form=gn",
                 "--option", "lissa.scale=50.0", "--methods", "lissa", "generalized_if"]) == 2
    cfg = seen["config"]
    assert cfg.method_options == {"lissa": {"depth": 1000, "scale": 50.0}, "generalized_if": {"form": "gn"}}
    assert cfg.methods == ("lissa", "generalized_if") and cfg.seeds == 10 and cfg.dataset == "diabetes"


def test_python_m_exit_status_and_one_line():
    """The real process: status 2 reaches the shell, stderr is a single line."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-m", "fimoda_kernels", "run", "--dataset", "nope"],
                          capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fimoda: error:") and "nope" in lines[0]
    assert "Traceback" not in proc.stderr and proc.stdout == ""


def test_help_lists_run_options(capsys):
    with pytest.raises(SystemExit) as e:
        main(["run", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for opt in ("--dataset", "--csv", "--methods", "--seeds", "--epochs", "--n-loo", "--further-lr",
                "--optimizer", "--mode", "--adjust", "--device", "--out"):
        assert opt in out


def test_continuous_target_refused_for_classification(capsys, csv_file, tmp_path):
    """A numeric target with fractional values is not a set of class labels, also when one label is
    text; a missing label spelled NA or nan is named as missing."""
    argv = ["--target", "y", "--task", "classification", "--out", str(tmp_path / "o")]
    _bad(capsys, ["run", "--csv", str(csv_file)] + argv, "numeric class labels must be integers, got '0.5'")
    lines = csv_file.read_text().splitlines()
    for label, match in [("NA", "line 42: missing label ('NA')"), ("other", "must be integers, got '0.5'")]:
        path = tmp_path / f"{label}.csv"
        path.write_text("\n".join(lines + [f"1,2,{label}"]) + "\n")
        _bad(capsys, ["run", "--csv", str(path)] + argv, match)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")
def test_failed_method_gives_exit_status_1(capsys, tmp_path):
    """A method that fails at run time (here a cuda backend on a machine without one) leaves the other
    methods' results written, and the run's exit status says it failed."""
    code = main(["run", "--methods", "grad_dot,grad_cos", "--option", "grad_dot.backend=cuda", "--n-loo", "4",
                 "--n-test", "3", "--seeds", "1", "--epochs", "1", "--final-epochs", "2", "--quiet", "--no-plots",
                 "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 1 and "method(s) failed: grad_dot (see results.json)" in err
    assert (tmp_path / "o" / "results.json").exists()


def test_run_time_failures_are_one_line_errors(capsys, tmp_path):
    """A diverging training or an unusable output directory: exit 2, one line naming the setting."""
    fast = ["--methods", "grad_dot", "--n-loo", "4", "--n-test", "3", "--seeds", "1", "--epochs", "1",
            "--final-epochs", "2", "--quiet", "--no-plots"]
    _bad(capsys, ["run", "--final-lr", "1e6", "--out", str(tmp_path / "a")] + fast,
         "final-model training diverged at epoch 1")
    _bad(capsys, ["run", "--further-lr", "1e8", "--out", str(tmp_path / "b")] + fast,
         "further training: lr: further training diverged")
    blocker = tmp_path / "file"
    blocker.write_text("")
    _bad(capsys, ["run", "--out", str(blocker)] + fast, "out / cache_dir: cannot create a directory there")


def test_reused_out_directory_drops_an_earlier_studys_files(tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    for name in ("cosine.png", "mislabel.png", "notes.txt"):
        (out / name).write_text("from an earlier study")
    assert main(["run", "--methods", "grad_dot", "--n-loo", "4", "--n-test", "3", "--seeds", "1", "--epochs", "1",
                 "--final-epochs", "2", "--quiet", "--no-plots", "--out", str(out)]) == 0
    left = sorted(p.name for p in out.iterdir() if p.is_file())
    assert left == ["curves.csv", "notes.txt", "results.json", "scores.npz", "seeds.csv"]
