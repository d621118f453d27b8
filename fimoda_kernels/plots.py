"""PNG figures of a study (matplotlib, Agg backend — no display needed).

- ``cosine.png``: mean cosine similarity to the gold vs further-training epochs, one line per method,
  SEM band over test points (the paper's Figure 2);
- ``spearman.png``: the same with Spearman's ρ (paper Figure 6);
- ``seeds.png``: peak cosine vs the number of seeds averaged into the gold (paper Figure 3);
- ``mislabel.png`` (with flipped labels): AUC of the gold self-influence vs epochs, each method's
  AUC as a horizontal line.
"""
from __future__ import annotations

import os

import numpy as np

__all__ = ["plot_curves", "plot_seed_study", "plot_mislabel", "write_all"]


def _finish(plt, fig, ax, path: str, title: str) -> str:
    """Title, grid, legend; write the PNG and free the figure."""
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _colors(methods):
    plt = _plt()
    cmap = plt.get_cmap("tab10")
    return {m: cmap(k % 10) for k, m in enumerate(methods)}


def plot_curves(curves: dict, metric: str, path: str, title: str = "") -> str:
    """``metric`` ("cosine" or "spearman") mean ± SEM vs evaluation point, per method."""
    plt = _plt()
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(7, 4.5))
    colors = _colors(curves)
    for m, c in curves.items():
        x = np.asarray(c["eval_points"], float)
        mean, sem = np.asarray(c[f"{metric}_mean"]), np.nan_to_num(np.asarray(c[f"{metric}_sem"]))
        ax.plot(x, mean, label=m, color=colors[m], lw=1.6, marker="o" if len(x) < 8 else None, ms=3)
        ax.fill_between(x, mean - sem, mean + sem, color=colors[m], alpha=0.2, lw=0)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("further-training epochs")
    ax.set_ylabel("cosine similarity to gold" if metric == "cosine" else "Spearman ρ with gold")
    ax.axhline(0, color="grey", lw=0.6)
    return _finish(plt, fig, ax, path, title)


def plot_seed_study(methods: dict, path: str, title: str = "") -> str:
    """Peak cosine (± SEM over groups × test points) vs number of seeds averaged."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4.5))
    colors = _colors(methods)
    for m, e in methods.items():
        rows = e.get("seed_study") or []
        if not rows:
            continue
        r = np.array([row["n_seeds"] for row in rows], float)
        v = np.array([np.nan if row["peak"] is None else row["peak"] for row in rows], float)
        s = np.array([0.0 if row["sem"] is None else row["sem"] for row in rows], float)
        ax.errorbar(r, v, yerr=np.nan_to_num(s), label=m, color=colors[m], marker="o", ms=4, capsize=2, lw=1.4)
    ax.set_xscale("log")
    ticks = sorted({row["n_seeds"] for e in methods.values() for row in (e.get("seed_study") or [])})
    ax.set_xticks(ticks, [str(t) for t in ticks])
    ax.minorticks_off()
    ax.set_xlabel("number of seeds averaged in the gold")
    ax.set_ylabel("peak cosine similarity")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_mislabel(gold_auc: dict, methods: dict, path: str, title: str = "") -> str:
    plt = _plt()
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(6, 4.5))
    x = np.asarray(gold_auc["eval_points"], float)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.plot(x, np.asarray(gold_auc["auc"], float), color="black", lw=2, label="gold (further training)")
    colors = _colors(methods)
    for m, e in methods.items():
        if e.get("mislabel_auc") is not None:
            ax.axhline(e["mislabel_auc"], color=colors[m], lw=1.2, ls="--", label=m)
    ax.axhline(0.5, color="grey", lw=0.6)
    ax.set_xlabel("further-training epochs")
    ax.set_ylabel("mislabel detection AUC (self-influence)")
    ax.set_ylim(0, 1.02)
    return _finish(plt, fig, ax, path, title)


def write_all(out: str, results: dict, curves: dict, title: str = "") -> list[str]:
    """Every figure of a study into ``out``; returns the file names."""
    files = [plot_curves(curves, "cosine", os.path.join(out, "cosine.png"), title),
             plot_curves(curves, "spearman", os.path.join(out, "spearman.png"), title),
             plot_seed_study(results["methods"], os.path.join(out, "seeds.png"), title)]
    if results.get("gold", {}).get("mislabel_auc") is not None:
        files.append(plot_mislabel(results["gold"]["mislabel_auc"], results["methods"],
                                   os.path.join(out, "mislabel.png"), title))
    return [os.path.basename(f) for f in files]
