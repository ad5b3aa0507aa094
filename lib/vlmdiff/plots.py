"""Figures: one style for all, saved as PNG and PDF side by side."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

plt.rcParams.update(
    {
        "figure.dpi": 110,
        "savefig.dpi": 150,
        "axes.spines.top": False,
        "axes.spines.right": False,
        "axes.grid": True,
        "grid.alpha": 0.3,
        "font.size": 9,
    }
)


def save(fig: plt.Figure, png: str | Path, pdf: str | Path | None = None) -> None:
    """Write the figure as PNG (and PDF), tight, then close it."""
    png = Path(png)
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, bbox_inches="tight")
    fig.savefig(pdf or png.with_suffix(".pdf"), bbox_inches="tight")
    plt.close(fig)


def accuracy_bars(table: pd.DataFrame, title: str) -> plt.Figure:
    """Grouped bars: accuracy per question family (and answer type) for each model."""
    t = table[table["family"] != "all"].copy()
    t["group"] = t["family"] + "\n(" + t["answer_type"] + ")"
    groups = sorted(t["group"].unique())
    models = list(dict.fromkeys(t["model"]))
    width = 0.8 / len(models)
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(groups)), 3.6))
    x = np.arange(len(groups))
    for i, m in enumerate(models):
        acc = t[t["model"] == m].set_index("group")["accuracy"].reindex(groups)
        ax.bar(x + (i - (len(models) - 1) / 2) * width, acc, width, label=m)
    base = t.drop_duplicates("group").set_index("group")["majority_baseline"].reindex(groups)
    ax.scatter(x, base, marker="_", s=600, color="black", zorder=3, label="majority answer")
    ax.set_xticks(x, groups)
    ax.set_ylim(0, 1.02)
    ax.set_ylabel("held-out accuracy")
    ax.set_title(title)
    ax.legend(fontsize=7, ncol=2, loc="lower right")
    return fig
