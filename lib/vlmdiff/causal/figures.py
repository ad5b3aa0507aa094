"""Figures of the causal experiments: attribution curves and maps (paper figures 12-14),
attention overlays (figures 4, 14-16), and steering flip rates."""

from __future__ import annotations

import textwrap
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import xarray as xr
from PIL import Image

from vlmdiff.causal.heads import feature_head_scores, head_label, ranked_heads
from vlmdiff.files import write_table
from vlmdiff.logs import Log
from vlmdiff.plots import axes_note, plt, save

METHOD_NAMES = {"A": "Method A: (corr − clean)·∇clean", "B": "Method B: (clean − corr)·∇corr"}
PAPER_ORDER = ("B", "A")  # the paper shows Method B on the left


@dataclass
class Overlay:
    """One attention overlay: the picture, the attention grid, and what to write above it."""

    image: Image.Image
    grid: np.ndarray
    head: tuple[int, int]
    query: str
    note: str = ""


def _empty(ax: plt.Axes, text: str) -> None:
    ax.set_axis_off()
    axes_note(ax, [text])


def _normalised(scores: xr.DataArray) -> xr.DataArray:
    """|score| per feature divided by its largest |score| (features weigh equally)."""
    a = abs(scores)
    top = a.max(("layer", "head"))
    return a / top.where(top > 0, 1)


def fig12_attribution_layers(ds: xr.Dataset, variant: str) -> plt.Figure:
    """Figure 12: per-layer attribution (Σ over heads of |score|, each feature normalised to a
    peak of 1), per feature (thin) and their mean (thick), Method B left, Method A right."""
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4), sharey=True)
    for ax, method in zip(axes, PAPER_ORDER, strict=True):
        ax.set_title(METHOD_NAMES[method], fontsize=9)
        ax.set_xlabel("layer of the attention head")
        if ds.sizes["feature"] == 0:
            _empty(ax, "no selected features: nothing attributed")
            continue
        per_layer = abs(ds["score"].sel({"method": method, "variant": variant})).sum("head")
        top = per_layer.max("layer")
        per_layer = per_layer / top.where(top > 0, 1)
        for feat in per_layer["feature"].values:
            ax.plot(per_layer["layer"], per_layer.sel(feature=feat), lw=0.8, alpha=0.5,
                    label=str(feat))
        ax.plot(per_layer["layer"], per_layer.mean("feature"), color="k", lw=2.2,
                label="mean over features")
        ax.legend(fontsize=6, ncol=2)
    axes[0].set_ylabel(f"Σ_heads |attribution| ({variant}), normalised")
    fig.suptitle(f"Layer-wise attribution to the selected features ({variant} variant)")
    fig.tight_layout()
    return fig


def _heatmap(ax: plt.Axes, grid: xr.DataArray, title: str, fig: plt.Figure,
             label: str = "|attribution|") -> None:
    im = ax.imshow(grid.transpose("head", "layer").values, aspect="auto", origin="lower",
                   cmap="viridis", interpolation="nearest")
    ax.set_xlabel("layer")
    ax.set_ylabel("head")
    ax.set_xticks(range(grid.sizes["layer"]), [str(v) for v in grid["layer"].values])
    ax.set_yticks(range(grid.sizes["head"]), [str(v) for v in grid["head"].values])
    ax.set_title(title, fontsize=8)
    ax.grid(False)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label=label)


def fig13_attribution_heads(ds: xr.Dataset, variant: str) -> plt.Figure:
    """Figure 13: head x layer maps of |score| averaged over features (each normalised to a
    peak of 1), Method B left, Method A right."""
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for ax, method in zip(axes, PAPER_ORDER, strict=True):
        if ds.sizes["feature"] == 0:
            _empty(ax, f"{METHOD_NAMES[method]}\nno selected features: nothing attributed")
            continue
        grid = _normalised(ds["score"].sel({"method": method, "variant": variant})).mean("feature")
        _heatmap(ax, grid, METHOD_NAMES[method], fig)
    fig.suptitle(f"Attention-head attribution, mean over features ({variant} variant)")
    fig.tight_layout()
    return fig


def top_head_summary(ds: xr.Dataset, variant: str, n: int = 3) -> pd.DataFrame:
    """Top-`n` heads per feature and method (by |score|), their overlap, and bottom-`n` heads."""
    rows = []
    for feat in ds["feature"].values:
        scores = {m: feature_head_scores(ds, feat, m, variant) for m in ("A", "B")}
        tops = {m: ranked_heads(s, n) for m, s in scores.items()}
        bottoms = {m: ranked_heads(s, n, bottom=True) for m, s in scores.items()}
        overlap = [h for h in tops["A"] if h in tops["B"]]
        rows.append({
            "feature": str(feat),
            "layer": int(ds["feature_layer"].sel(feature=feat)),
            "feature_index": int(ds["feature_index"].sel(feature=feat)),
            "variant": variant,
            "top_A": " ".join(head_label(*h) for h in tops["A"]),
            "top_B": " ".join(head_label(*h) for h in tops["B"]),
            "overlap": " ".join(head_label(*h) for h in overlap),
            "bottom_A": " ".join(head_label(*h) for h in bottoms["A"]),
            "bottom_B": " ".join(head_label(*h) for h in bottoms["B"]),
        })
    cols = ["feature", "layer", "feature_index", "variant", "top_A", "top_B", "overlap",
            "bottom_A", "bottom_B"]
    return pd.DataFrame(rows, columns=cols)


def draw_overlay(ax: plt.Axes, ov: Overlay, *, title_width: int = 30) -> None:
    """The picture with the head's attention (upsampled bilinearly) drawn translucently over it;
    the head and the query as the title."""
    w, h = ov.image.size
    grid = ov.grid.astype(np.float32)
    heat = np.asarray(Image.fromarray(grid, mode="F").resize((w, h), Image.BILINEAR))
    # scaled so that 4x the uniform share is full colour: diffuse attention stays faint
    top = max(float(heat.max()), 4.0 / grid.size)
    ax.imshow(ov.image)
    ax.imshow(heat / top, cmap="jet", alpha=0.45, vmin=0, vmax=1,
              extent=(-0.5, w - 0.5, h - 0.5, -0.5), interpolation="bilinear")
    query = "\n".join(textwrap.wrap(f"“{ov.query}”", title_width))
    title = f"{head_label(*ov.head)}: {query}"
    if ov.note:
        title = f"{ov.note}\n{title}"
    ax.set_title(title, fontsize=6.5)
    ax.set_axis_off()


def overlay_grid(rows: Sequence[Sequence[Overlay]], title: str, row_labels: Sequence[str],
                 empty: str) -> plt.Figure:
    """A figure of overlays, one row per list, with a label at the left of each row."""
    if not rows or not any(rows):
        fig, ax = plt.subplots(figsize=(6, 2))
        _empty(ax, empty)
        fig.suptitle(title, fontsize=9)
        return fig
    n_cols = max(len(r) for r in rows)
    fig, axes = plt.subplots(len(rows), n_cols, figsize=(2.1 * n_cols + 0.8, 2.5 * len(rows)),
                             squeeze=False)
    for i, row in enumerate(rows):
        for j in range(n_cols):
            ax = axes[i, j]
            if j < len(row):
                draw_overlay(ax, row[j])
            else:
                ax.set_axis_off()
        axes[i, 0].text(-0.12, 0.5, row_labels[i], transform=axes[i, 0].transAxes,
                        rotation=90, va="center", ha="right", fontsize=7)
    fig.tight_layout()
    fig.suptitle("\n".join(textwrap.wrap(title, 110)), fontsize=9, y=1.02)
    return fig


def fig14_feature_panels(ds: xr.Dataset, variant: str,
                         overlays: dict[str, list[Overlay]], relations: dict[str, str]
                         ) -> plt.Figure:
    """Figure 14: per feature, head x layer maps (Methods A and B) and overlays of its
    strongest heads on its top-activating VQA and VSR samples; the title lists the top-3 heads
    per method and their overlap."""
    feats = list(ds["feature"].values)
    if not feats:
        fig, ax = plt.subplots(figsize=(6, 2))
        _empty(ax, "no selected features: no per-feature panels")
        return fig
    summary = top_head_summary(ds, variant).set_index("feature")
    n_ov = max((len(v) for v in overlays.values()), default=0)
    # One subfigure per feature, so each row's title sits above its own panels and the
    # constrained layout keeps colour bars and titles from running into the next row.
    fig = plt.figure(figsize=(3.2 * 2 + 2.0 * n_ov, 3.0 * len(feats) + 0.4), layout="constrained")
    subs = fig.subfigures(len(feats), 1, squeeze=False)[:, 0]
    for sub, feat in zip(subs, feats, strict=True):
        s = summary.loc[feat]
        axes = sub.subplots(1, 2 + n_ov, width_ratios=[1.45, 1.45] + [1.0] * n_ov, squeeze=False)[0]
        for j, method in enumerate(("A", "B")):
            _heatmap(axes[j], abs(feature_head_scores(ds, feat, method, variant)),
                     f"|Method {method}| ({variant})", sub, label="")
        for j in range(n_ov):
            if j < len(overlays.get(feat, [])):
                draw_overlay(axes[2 + j], overlays[feat][j])
            else:
                axes[2 + j].set_axis_off()
        rel = relations.get(feat, "")
        head = (f"{feat} (layer {s['layer']}, feature {s['feature_index']})"
                + (f" · VSR relation: {rel}" if rel else "")
                + f" · top heads A: {s['top_A']} · B: {s['top_B']} · overlap: {s['overlap'] or 'none'}")
        sub.suptitle("\n".join(textwrap.wrap(head, 40 + 25 * n_ov)), fontsize=8,
                     fontweight="bold", x=0.01, ha="left")
    fig.suptitle("Attribution patching on individual features", fontsize=10)
    return fig


def fig_steering(table: pd.DataFrame) -> plt.Figure:
    """Flip rate of the yes/no answer against the steering strength α, one panel per feature,
    one line per evaluation set."""
    feats = list(dict.fromkeys(table["feature"])) if len(table) else []
    if not feats:
        fig, ax = plt.subplots(figsize=(6, 2.5))
        _empty(ax, "no selected features (or none fires on VSR): nothing steered")
        fig.suptitle("Steering along a feature's decoder direction")
        return fig
    n = len(feats)
    cols = min(n, 3)
    rows = int(np.ceil(n / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 2.9 * rows), squeeze=False,
                             sharey=True)
    styles = {"VSR relation subset": ("C3", "-"), "VQA yes/no": ("C0", "-"),
              "VSR relation subset, random feature": ("0.5", "--")}
    for ax, feat in zip(axes.ravel(), feats, strict=False):
        part = table[table["feature"] == feat]
        for name, grp in part.groupby("eval_set", sort=False):
            colour, ls = styles.get(str(name), ("C2", ":"))
            grp = grp.sort_values("alpha")
            ax.plot(grp["alpha"], grp["flip_rate"], marker="o", ms=3, color=colour, ls=ls,
                    label=f"{name} (n={int(grp['n'].iloc[0])})")
        rel = part["vsr_relations"].iloc[0]
        ax.set_title(f"{feat} · relations: {rel}", fontsize=8)
        ax.set_xlabel("α (× mean residual norm at layer L)")
        ax.set_ylim(-0.02, 1.02)
        ax.legend(fontsize=6)
    for ax in axes.ravel()[n:]:
        ax.set_axis_off()
    for ax in axes[:, 0]:
        ax.set_ylabel("flip rate of the yes/no answer")
    fig.suptitle("Steering: adding α·v at text positions after block L")
    fig.tight_layout()
    return fig


def fig_patching_check(ds: xr.Dataset) -> plt.Figure:
    """Attribution estimates against exact activation patching (own direction), per variant."""
    pairs = [("qk", "qk"), ("output", "output")]
    if "qk_atpstar" in ds["variant"].values:
        pairs.append(("qk_atpstar", "qk"))
    fig, axes = plt.subplots(2, len(pairs), figsize=(3.3 * len(pairs), 6), squeeze=False)
    for j, (variant, patched) in enumerate(pairs):
        for i, method in enumerate(("A", "B")):
            ax = axes[i, j]
            ax.set_title(f"Method {method}, {variant}", fontsize=8)
            ax.set_xlabel(f"exact patching effect ({patched})")
            ax.set_ylabel("attribution estimate")
            if "exact" not in ds or ds.sizes["feature"] == 0:
                axes_note(ax, ["no exact patching results"])
                continue
            for feat in ds["feature"].values:
                layer = int(ds["feature_layer"].sel(feature=feat))
                est = ds["score"].sel({"feature": feat, "method": method, "variant": variant})
                ex = ds["exact"].sel({"feature": feat, "method": method, "patched": patched})
                ax.scatter(ex.isel(layer=slice(0, layer + 1)).values.ravel(),
                           est.isel(layer=slice(0, layer + 1)).values.ravel(), s=8, label=feat)
            lims = ax.get_xlim()
            ax.plot(lims, lims, color="0.4", lw=0.7, ls="--", label="y = x")
            ax.legend(fontsize=5)
    fig.suptitle("Attribution patching vs exact activation patching, one head at a time")
    fig.tight_layout()
    return fig


def attribution_figures_job(
    *,
    scores_path: str | Path,
    variant: str,
    n_heads: int,
    out: Mapping[str, str | Path],
    log: Log = print,
) -> None:
    """The `attribution_figures` rule: figures 12 and 13 and the check against exact patching
    (`out["fig12"]`, `out["fig13"]`, `out["check"]`, each with a `_pdf`) and the top/bottom
    heads table (`out["heads"]`) from the attribution scores."""
    ds = xr.load_dataset(scores_path)
    save(fig12_attribution_layers(ds, variant), out["fig12"], out["fig12_pdf"])
    save(fig13_attribution_heads(ds, variant), out["fig13"], out["fig13_pdf"])
    save(fig_patching_check(ds), out["check"], out["check_pdf"])
    write_table(top_head_summary(ds, variant, n_heads), out["heads"])
    log(f"figures 12, 13 and the patching check for {ds.sizes['feature']} features")
