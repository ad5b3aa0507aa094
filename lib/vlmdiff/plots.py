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


REGIME_COLOURS = {"full": "#1f77b4", "image": "#d62728", "text": "#2ca02c", "random": "#7f7f7f"}


def fig1_fvu_curves(histories: pd.DataFrame, summary: pd.DataFrame) -> plt.Figure:
    """Figure 1: mean held-out FVU across layers vs tokens seen, per regime, + summary table."""
    fig, (ax, tab) = plt.subplots(1, 2, figsize=(10, 3.8), gridspec_kw={"width_ratios": [3, 2]})
    for regime, h in histories.groupby("regime", sort=False):
        curve = h.groupby("tokens_seen")["fvu"].agg(["mean", "std"]).reset_index()
        c = REGIME_COLOURS.get(regime)
        ax.plot(curve["tokens_seen"], curve["mean"], marker="o", ms=3, color=c, label=regime)
        ax.fill_between(curve["tokens_seen"], curve["mean"] - curve["std"],
                        curve["mean"] + curve["std"], color=c, alpha=0.12)
    ax.set_xlabel("training tokens seen (loss-masked)")
    ax.set_ylabel("FVU (held-out, mean over layers)")
    ax.set_yscale("log")
    ax.set_title("SAE adaptation: FVU vs tokens seen")
    ax.legend(title="regime")
    tab.axis("off")
    cells = [[r["regime"], *(f"{r[c]:.4f}" for c in ("mean", "std", "min", "max"))]
             for _, r in summary.iterrows()]
    table = tab.table(cellText=cells, colLabels=["regime", "mean", "std", "min", "max"],
                      loc="center", cellLoc="right")
    table.scale(1, 1.4)
    for i, (_, r) in enumerate(summary.iterrows(), start=1):
        if r["best"]:
            for j in range(5):
                table[i, j].get_text().set_fontweight("bold")
    tab.set_title("final FVU across layers (lowest mean in bold)")
    return fig


def fig5_decoder_cosine(cos) -> plt.Figure:
    """Figure 5: mean decoder cosine (base vs adapted) per layer, one line per regime."""
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for regime in cos["regime"].values:
        c = cos.sel(regime=regime)
        mean, std = c.mean("feature"), c.std("feature")
        col = REGIME_COLOURS.get(str(regime))
        ax.plot(c["layer"], mean, marker="o", color=col, label=str(regime))
        ax.fill_between(c["layer"], mean - std, mean + std, color=col, alpha=0.12)
    ax.axhline(0, color="black", lw=0.6)
    ax.set_xlabel("layer")
    ax.set_ylabel("decoder cosine (LM SAE vs VLM SAE)")
    ax.set_ylim(-0.1, 1.02)
    ax.set_title("Decoder cosine similarity vs layer")
    ax.legend(title="regime")
    return fig


def fig6_fvu_per_layer(histories: pd.DataFrame) -> plt.Figure:
    """Figure 6: held-out FVU trajectories, one panel per layer, one line per regime."""
    layers = sorted(histories["layer"].unique())
    ncols = min(4, len(layers))
    nrows = -(-len(layers) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.2 * ncols, 2.5 * nrows), squeeze=False,
                             sharex=True)
    for ax, layer in zip(axes.flat, layers, strict=False):
        for regime, h in histories[histories["layer"] == layer].groupby("regime", sort=False):
            h = h.sort_values("tokens_seen")
            ax.plot(h["tokens_seen"], h["fvu"], color=REGIME_COLOURS.get(regime), label=regime)
        ax.set_yscale("log")
        ax.set_title(f"layer {layer}")
    for ax in axes.flat[len(layers):]:
        ax.axis("off")
    for ax in axes[-1]:
        ax.set_xlabel("tokens seen")
    for ax in axes[:, 0]:
        ax.set_ylabel("FVU (held-out)")
    axes.flat[0].legend(fontsize=7, title="regime")
    fig.suptitle("Per-layer FVU across regimes")
    fig.tight_layout()
    return fig
