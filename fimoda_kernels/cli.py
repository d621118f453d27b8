"""``fimoda`` command line (also ``python -m fimoda_kernels``).

``fimoda run`` runs a whole FiMODA study (see :mod:`fimoda_kernels.experiment`) and prints its
summary table; bad input gives one line on stderr and exit status 2, a failed method (the others' results
still written) exit status 1.
"""
from __future__ import annotations

import argparse
import sys

from .datasets import EMBEDDED_DATASETS, DatasetError

__all__ = ["main", "build_parser"]

EXIT_USAGE = 2


class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    """argparse, but errors raise instead of printing usage + message and exiting."""

    def error(self, message):
        raise _UsageError(message)


def _number(convert, ok, expected):
    """An argparse type: ``convert`` the text, then require ``ok(value)``; one message either way."""
    def parse(text):
        try:
            v = convert(text)
        except ValueError:
            v = None
        if v is None or not ok(v):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return v
    return parse


_positive_int = _number(int, lambda v: v >= 1, "a positive integer")
_positive_float = _number(float, lambda v: 0 < v < float("inf"), "a positive number")
_fraction = _number(float, lambda v: 0 <= v < 1, "a number in [0, 1)")


def _method_option(text):
    import ast

    key, sep, value = text.partition("=")
    method, dot, name = key.partition(".")
    if not (sep and dot and method and name.isidentifier()):
        raise argparse.ArgumentTypeError(f"expected METHOD.NAME=VALUE, got {text!r}")
    try:
        value = ast.literal_eval(value)
    except (ValueError, SyntaxError):
        pass  # a plain string such as form=gn
    return method, name, value


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="fimoda", description="Final-model-only data attribution (FiMODA) studies.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    r = sub.add_parser("run", help="run a study: final model, attribution methods, further-training gold, metrics",
                       description="Train the final model, score every method, further-train the LOO ensemble "
                                   "(gold standard) and report how well each method approximates it.")
    data = r.add_mutually_exclusive_group()
    data.add_argument("--dataset", choices=EMBEDDED_DATASETS, default=None,
                      help="embedded data set (default: diabetes)")
    data.add_argument("--csv", metavar="PATH", help="CSV file with a header row (numeric features)")
    r.add_argument("--target", metavar="COLUMN", help="CSV target column")
    r.add_argument("--drop", metavar="COLUMN", nargs="+", action="extend", default=[], help="CSV columns to ignore")
    r.add_argument("--task", choices=("regression", "classification"), default=None,
                   help="CSV task (default: regression; the built-in datasets know theirs)")
    r.add_argument("--methods", nargs="+", default=["all"], metavar="METHOD",
                   help="'all' (default) or method names, space or comma separated")
    r.add_argument("--option", dest="options", metavar="METHOD.NAME=VALUE", action="append", default=[],
                   type=_method_option, help="a method option passed to attribute(), e.g. lissa.depth=1000 "
                                             "(repeatable; values are Python literals or strings)")
    r.add_argument("--seeds", type=_positive_int, default=10, help="further-training seeds R (default: 10)")
    r.add_argument("--epochs", type=_positive_int, default=50, help="further-training epochs (default: 50)")
    r.add_argument("--n-loo", type=_positive_int, default=100, help="LOO training points (default: 100)")
    r.add_argument("--n-test", type=_positive_int, default=None, help="test points evaluated (default: all)")
    r.add_argument("--final-lr", type=_positive_float, default=None, help="final-model SGD learning rate")
    r.add_argument("--final-epochs", type=_positive_int, default=None, help="final-model SGD epochs")
    r.add_argument("--batch-size", type=_positive_int, default=128, help="batch size (default: 128)")
    r.add_argument("--further-lr", type=_positive_float, default=None,
                   help="further-training learning rate (default: final lr / 10 for sgd, / 100 for adam)")
    r.add_argument("--optimizer", choices=("sgd", "adam", "adamw"), default="sgd")
    r.add_argument("--mode", choices=("remove", "downweight"), default="remove")
    r.add_argument("--adjust", choices=("mean", "full"), default="mean",
                   help="gold adjustment: mean of LOO runs (eq. 13) or the full-data run (eq. 17)")
    r.add_argument("--mislabel-fraction", type=_fraction, default=0.2,
                   help="classification: share of LOO labels flipped for mislabel detection (0: off)")
    r.add_argument("--seed", type=int, default=0, help="seed of the init, LOO set and flips (default: 0)")
    r.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    r.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    r.add_argument("--out", metavar="DIR", default=None, help="output directory (default: runs/<dataset>)")
    r.add_argument("--cache-dir", metavar="DIR", default=None, help="stage cache (default: <out>/cache)")
    r.add_argument("--no-plots", action="store_true", help="skip the PNG figures")
    r.add_argument("--quiet", action="store_true", help="no progress bars or stage messages")
    return p


def _config(args):
    from .experiment import StudyConfig

    if args.csv is None and (args.target is not None or args.drop or args.task is not None):
        raise _UsageError("--target/--drop/--task apply to --csv only (the built-in datasets know their task)")
    if args.csv is not None and args.target is None:
        raise _UsageError("--csv needs --target COLUMN")
    methods = [m for chunk in args.methods for m in chunk.split(",") if m]
    options = {}
    for method, name, value in args.options:
        options.setdefault(method, {})[name] = value
    return StudyConfig(
        dataset=args.dataset or "diabetes", csv=args.csv, target=args.target, drop=tuple(args.drop),
        task=args.task or "regression", methods="all" if methods == ["all"] else tuple(methods), method_options=options,
        seeds=args.seeds,
        epochs=args.epochs, n_loo=args.n_loo, n_test=args.n_test, final_lr=args.final_lr,
        final_epochs=args.final_epochs, batch_size=args.batch_size, further_lr=args.further_lr,
        optimizer=args.optimizer, mode=args.mode, adjust=args.adjust, mislabel_fraction=args.mislabel_fraction,
        seed=args.seed, device=args.device, dtype=args.dtype, out=args.out, cache_dir=args.cache_dir,
        progress=not args.quiet, plots=not args.no_plots)


def main(argv=None) -> int:
    """Entry point of ``fimoda``; returns the exit status (0 ok, 1 a method failed or a dependency is
    missing, 2 bad input; the console script and ``python -m fimoda_kernels`` pass it to ``sys.exit``)."""
    from .experiment import MissingDependencyError, StudyConfigError, StudyRunError, run_study

    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if args.command is None:
            raise _UsageError("expected a command: run (see fimoda run --help)")
        config = _config(args)
        result = run_study(config)
    except (_UsageError, StudyConfigError, DatasetError, StudyRunError) as e:
        msg = " ".join(str(e).split())  # one line, whatever the message held
        print(f"fimoda: error: {msg}", file=sys.stderr)
        return EXIT_USAGE
    except MissingDependencyError as e:
        print(f"fimoda: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("fimoda: interrupted (finished stages are cached; re-run to resume)", file=sys.stderr)
        return 130
    print(result.table())
    print(f"artifacts in {result.out_dir}: {', '.join(result.artifacts)}")
    failed = [m for m, e in result.results["methods"].items() if "error" in e]
    if failed:  # the others' results are written; the run as a whole did not do what was asked
        print(f"fimoda: error: method(s) failed: {', '.join(failed)} (see results.json)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
