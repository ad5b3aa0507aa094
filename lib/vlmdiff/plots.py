"""Figures: one style for all, saved as PNG and PDF side by side."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from vlmdiff.files import atomic_path  # noqa: E402

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
    """Write the figure as PNG (and PDF), tight, each atomically, then close it."""
    png = Path(png)
    for path in (png, Path(pdf or png.with_suffix(".pdf"))):
        # no creation date in the PDF, so that one seed gives the same bytes every run
        meta = {"CreationDate": None} if path.suffix == ".pdf" else None
        with atomic_path(path) as tmp:
            fig.savefig(tmp, bbox_inches="tight", metadata=meta)
    plt.close(fig)


def _bar_slots(n_groups: int, n_models: int) -> tuple[np.ndarray, float, list[float]]:
    """Group centres, bar width and each model's offset for bars grouped side by side."""
    width = 0.8 / n_models
    return np.arange(n_groups), width, [(i - (n_models - 1) / 2) * width for i in range(n_models)]


def accuracy_bars(
    table: pd.DataFrame, title: str, by: tuple[str, str] = ("family", "answer_type")
) -> plt.Figure:
    """Grouped bars: accuracy per `by[0]` (and `by[1]`, e.g. question family and answer type)
    for each model, with the majority-answer baseline."""
    group, sub = by
    t = table[table[group] != "all"].copy()
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * t.groupby([group, sub]).ngroups), 3.6))
    if t.empty:
        axes_note(ax, [f"no questions with a {group}"])
        ax.set_title(title)
        return fig
    t["group"] = t[group].astype(str) + "\n(" + t[sub].astype(str) + ")"
    groups = sorted(t["group"].unique())
    models = list(dict.fromkeys(t["model"]))
    x, width, offsets = _bar_slots(len(groups), len(models))
    for m, off in zip(models, offsets, strict=True):
        acc = t[t["model"] == m].set_index("group")["accuracy"].reindex(groups)
        ax.bar(x + off, acc, width, label=m)
    base = t.drop_duplicates("group").set_index("group")["majority_baseline"].reindex(groups)
    ax.scatter(x, base, marker="_", s=600, color="black", zorder=3, label="majority answer")
    ax.set_xticks(x, groups)
    ax.set_ylim(0, 1.02)
    ax.set_ylabel("held-out accuracy")
    ax.set_title(title)
    # outside the axes: a well-trained model's bars reach the top and would hide under it
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return fig


def error_bars(table: pd.DataFrame, title: str) -> plt.Figure:
    """Per family (panel) and number of objects: each model's correct share (solid) with the
    share answered by another object's attribute stacked on it (hatched); the rest of each bar's
    height up to 1 is answers not in the scene (`evaluation.attribute_errors`)."""
    families = list(dict.fromkeys(table["family"]))
    fig, axes = plt.subplots(1, max(1, len(families)), figsize=(5 * max(1, len(families)), 3.6),
                             squeeze=False)
    if not families:
        axes_note(axes[0, 0], ["no colour or shape questions with a scene"])
        axes[0, 0].set_title(title)
        return fig
    models = list(dict.fromkeys(table["model"]))
    for ax, family in zip(axes[0], families, strict=True):
        t = table[table["family"] == family]
        groups = list(dict.fromkeys(t["n_objects"].astype(str)))
        x, width, offsets = _bar_slots(len(groups), len(models))
        for m, off in zip(models, offsets, strict=True):
            r = t[t["model"] == m]
            r = r.set_index(r["n_objects"].astype(str)).reindex(groups)
            pos = x + off
            bars = ax.bar(pos, r["correct"], width, label=m)
            ax.bar(pos, r["another object's"], width, bottom=r["correct"], hatch="//",
                   color="none", edgecolor=bars.patches[0].get_facecolor(), linewidth=0)
        ax.set_xticks(x, groups)
        ax.set_xlabel("objects in the scene")
        ax.set_ylim(0, 1.02)
        ax.set_title(f"{family} questions")
    axes[0, 0].set_ylabel("share of answers")
    handles, labels = axes[0, 0].get_legend_handles_labels()
    handles.append(plt.Rectangle((0, 0), 1, 1, facecolor="none", edgecolor="gray", hatch="//"))
    labels.append("another object's attribute")
    axes[0, -1].legend(handles, labels, fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.suptitle(title, y=1.03)
    return fig


REGIME_COLOURS = {"full": "#1f77b4", "image": "#d62728", "text": "#2ca02c", "random": "#7f7f7f"}


def position_lines(table: pd.DataFrame, title: str) -> plt.Figure:
    """R^2 of linear probes for each patch's column (solid) and row (dashed), per model, from
    the vision tower through the projector to every language-model layer
    (`evaluation.image_token_positions`)."""
    fig, ax = plt.subplots(figsize=(7, 3.4))
    for i, (model, t) in enumerate(table.groupby("model", sort=False)):
        t = t.sort_values("depth")
        ax.plot(t["depth"], t["r2_column"], marker="o", color=f"C{i}", label=f"{model}: column")
        ax.plot(t["depth"], t["r2_row"], marker="s", ls="--", color=f"C{i}", label=f"{model}: row")
    labels = table.drop_duplicates("depth").sort_values("depth")
    short = {"vision tower": "tower", "projector (LM input)": "projector"}
    ax.set_xticks(labels["depth"], [short.get(w, w.replace("LM layer ", "L")) for w in labels["where"]])
    ax.axhline(0, color="grey", lw=0.8)
    low = float(table[["r2_column", "r2_row"]].min().min())
    ax.set_ylim(min(-0.05, low - 0.05), 1.02)
    ax.set_xlabel("image tokens at: vision tower, projector output, language-model layer")
    ax.set_ylabel("held-out R$^2$ of the patch's place")
    ax.set_title(title)
    ax.legend(fontsize=7)
    return fig


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


# ------------------------------------------------------------------ feature selection (stage 2-3)

ADAPTED_COLOUR, SPATIAL_COLOUR = "#e377c2", "#1f77b4"
OCR_COLOUR, SELECTED_COLOUR = "#9467bd", "#d62728"
ALL_STYLE = {"s": 5, "c": "0.7", "lw": 0}
SPATIAL_CANDIDATE_STYLE = {"marker": "s", "s": 22, "facecolors": "none", "lw": 0.8,
                           "edgecolors": SPATIAL_COLOUR}
SPATIAL_SET_STYLE = {"marker": "s", "s": 22, "c": SPATIAL_COLOUR}
OCR_CANDIDATE_STYLE = {"marker": "D", "s": 20, "facecolors": "none", "lw": 0.8,
                       "edgecolors": OCR_COLOUR}
OCR_SET_STYLE = {"marker": "D", "s": 20, "c": OCR_COLOUR}
SELECTED_STYLE = {"marker": "x", "s": 40, "c": SELECTED_COLOUR, "lw": 1.4}


def _mark(ax: plt.Axes, x: pd.Series, y: pd.Series, label: str, **style) -> None:
    """Scatter with the point count in the legend label ("none" when there are none)."""
    n = len(x)
    ax.scatter(x, y, label=f"{label} ({n})" if n else f"{label} (none)", **style)


def _overlay(ax: plt.Axes, x: pd.Series, y: pd.Series, marks: list[tuple]) -> None:
    """`_mark` the rows of each `(mask, label, style)` in turn, over what is drawn."""
    for mask, label, style in marks:
        _mark(ax, x[mask], y[mask], label, **style)


def axes_note(ax: plt.Axes, lines: list[str]) -> None:
    """A boxed note in the upper left of the axes (used to say that a set is empty)."""
    if lines:
        box = {"boxstyle": "round", "fc": "white", "ec": "0.6", "alpha": 0.9}
        ax.text(0.02, 0.98, "\n".join(lines), transform=ax.transAxes, va="top", fontsize=7,
                bbox=box)


def _empty_notes(table: pd.DataFrame, contrast: str) -> list[str]:
    """Why the contrast's set is empty, stage by stage; nothing when it is not."""
    n_cand = int(table[f"{contrast}_candidate"].sum())
    n_pass = int((table[f"{contrast}_candidate"] & table[f"{contrast}_lexical_pass"]).sum())
    if table[f"{contrast}_set"].any():
        return []
    return [
        f"{contrast} set is empty: {n_cand} candidates, {n_pass} passed the lexical",
        f"filter, none of them in the adapted set ({int(table['adapted'].sum())} features)",
    ]


def _energy_cosine(ax: plt.Axes, table: pd.DataFrame, eps: float) -> pd.Series:
    """All features (grey) and the adapted set (pink) by decoder cosine and E_v (log), with the
    thresholds; returns the plotted E_v, zeros drawn a decade below the smallest positive."""
    positive = table["E_v"][table["E_v"] > 0]
    floor = float(positive.min()) / 10 if len(positive) else 1e-6
    energy = table["E_v"].where(table["E_v"] > 0, floor)
    _mark(ax, table["c_f"], energy, "all features", **ALL_STYLE)
    adapted_style = {"s": 8, "c": ADAPTED_COLOUR, "lw": 0}
    _overlay(ax, table["c_f"], energy, [(table["adapted"], "adapted", adapted_style)])
    ax.axhline(max(eps, floor), color="0.3", ls="--", lw=0.8)
    ax.axvline(table["cos_threshold"].iloc[0], color="0.3", ls=":", lw=0.8)
    ax.set_yscale("log")
    ax.set_xlabel("decoder cosine $c_f$ (base SAE vs adapted SAE)")
    ax.set_ylabel(f"visual energy $E_v$ (log; $E_v$ = 0 drawn at {floor:.0e})")
    return energy


def fig2_feature_selection(table: pd.DataFrame, eps: float, p_cos: float) -> plt.Figure:
    """Figure 2: features by E_v and c_f; adapted (pink), spatial candidates (blue squares),
    spatial set (filled blue squares), the chosen subset (red crosses)."""
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    energy = _energy_cosine(ax, table, eps)
    _overlay(ax, table["c_f"], energy, [
        (table["spatial_candidate"], "spatial candidates", SPATIAL_CANDIDATE_STYLE),
        (table["spatial_set"], "spatial set", SPATIAL_SET_STYLE),
        (table["spatial_selected"], "selected for analysis", SELECTED_STYLE),
    ])
    axes_note(ax, _empty_notes(table, "spatial"))
    ax.set_title("SAE features by visual energy and decoder cosine\n(adapted: $E_v$ > "
                 f"{eps:g}, $c_f$ in the bottom {p_cos:g}% over all layers; dashed/dotted: "
                 "thresholds)")
    ax.legend(fontsize=7, loc="lower left")
    return fig


def fig7_adapted_per_layer(per_layer: pd.DataFrame) -> plt.Figure:
    """Figure 7: (a) adapted features per layer; (b) mean decoder cosine, adapted vs all."""
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.4))
    layer = per_layer["layer"]
    a.bar(layer, per_layer["n_adapted"], color=ADAPTED_COLOUR, label="adapted features")
    a.set_ylabel("number of adapted features")
    a.set_title("(a) Adapted features per layer")
    if per_layer["n_adapted"].sum() == 0:
        axes_note(a, ["the adapted set is empty"])
    b.plot(layer, per_layer["mean_cos_all"], marker="o", color="0.4", label="all features")
    b.plot(layer, per_layer["mean_cos_adapted"], marker="o", color=ADAPTED_COLOUR,
           label="adapted features")
    b.set_ylabel("mean decoder cosine $c_f$")
    b.set_title("(b) Decoder cosine by layer")
    for ax in (a, b):
        ax.set_xticks(layer)
        ax.set_xlabel("layer")
        ax.legend(fontsize=7)
    fig.suptitle("Per-layer statistics of adapted features")
    fig.tight_layout()
    return fig


def fig8_threshold_sweep(sweep: pd.DataFrame) -> plt.Figure:
    """Figure 8: adapted-set size, Jaccard with the operating point and per-layer count
    correlation over the (p_cos, eps) grid; the white circle is the operating point."""
    p_values, e_values = sorted(sweep["p_cos"].unique()), sorted(sweep["eps"].unique())
    panels = [
        ("n_selected", "features selected", "viridis"),
        ("jaccard", "Jaccard overlap with operating point", "magma"),
        ("layer_count_corr", "per-layer count correlation", "cividis"),
    ]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    op = sweep[sweep["operating_point"]].iloc[0]
    for ax, (col, label, cmap) in zip(axes, panels, strict=True):
        grid = sweep.pivot(index="eps", columns="p_cos", values=col)
        grid = grid.reindex(index=e_values, columns=p_values).to_numpy(dtype=float)
        fig.colorbar(ax.imshow(grid, origin="lower", aspect="auto", cmap=cmap), ax=ax, label=label)
        ax.set_xticks(range(len(p_values)), [f"{v:g}" for v in p_values])
        ax.set_yticks(range(len(e_values)), [f"{v:.0e}" if v else "0" for v in e_values])
        ax.set_xlabel("cosine percentile $p_{cos}$ (%)")
        ax.set_ylabel(r"visual energy threshold $\epsilon$")
        ax.scatter([p_values.index(op["p_cos"])], [e_values.index(op["eps"])], s=90,
                   facecolors="none", edgecolors="white", lw=2, label="operating point")
        ax.set_title(label)
        ax.grid(False)
        ax.legend(fontsize=7, loc="upper left")
    fig.suptitle(f"Threshold sweep for feature selection (operating point: p_cos = "
                 f"{op['p_cos']:g}%, ε = {op['eps']:g}, {int(op['n_selected'])} features; "
                 "blank cells: undefined)")
    fig.tight_layout()
    return fig


def fig9_firing_frequency(table: pd.DataFrame, contrast: str = "spatial") -> plt.Figure:
    """Figure 9: (a) firing-frequency distributions on D_base and D_sp; (b) p_f on both splits,
    spatial candidates and the set highlighted."""
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    pb, pc = table["p_val"], table[f"p_{contrast}"]
    positive = pd.concat([pb[pb > 0], pc[pc > 0]])
    low = float(positive.min()) if len(positive) else 1e-4
    bins = np.logspace(np.log10(low) - 0.1, 0.01, 40)
    for p, name, colour in ((pb, "D_base (val)", "0.4"), (pc, "D_sp", SPATIAL_COLOUR)):
        a.hist(p[p > 0], bins=bins, histtype="step", lw=1.4, color=colour,
               label=f"{name}; {int((p == 0).sum())} features never fire")
    a.set_xscale("log")
    a.set_xlabel("firing frequency $p_f$ (fraction of tokens with $h_f > 0$)")
    a.set_ylabel("number of features")
    a.set_title("(a) Firing-frequency distributions")
    a.legend(fontsize=7)
    floor = low / 3
    x, y = pb.where(pb > 0, floor), pc.where(pc > 0, floor)
    _mark(b, x, y, "all features", **ALL_STYLE)
    _overlay(b, x, y, [
        (table[f"{contrast}_candidate"], "candidates", SPATIAL_CANDIDATE_STYLE),
        (table[f"{contrast}_set"], f"{contrast} set", SPATIAL_SET_STYLE),
        (table[f"{contrast}_selected"], "selected", SELECTED_STYLE),
    ])
    b.plot([floor, 1], [floor, 1], color="0.3", lw=0.8, ls="--", label="equal frequency")
    b.set_xscale("log")
    b.set_yscale("log")
    b.set_xlabel(f"$p_f$(D_base) (log; 0 drawn at {floor:.0e})")
    b.set_ylabel(f"$p_f$(D_sp) (log; 0 drawn at {floor:.0e})")
    b.set_title("(b) Spatial candidates under both splits")
    b.legend(fontsize=7, loc="lower right")
    axes_note(b, _empty_notes(table, contrast))
    fig.suptitle("Spatial distribution shift: feature firing frequencies, spatial vs base split")
    fig.tight_layout()
    return fig


def fig10_ocr_features(table: pd.DataFrame, eps: float, thresholds: dict) -> plt.Figure:
    """Figure 10: OCR candidates among adapted units (purple) beside the spatial set (blue);
    right: the OCR contrast, Δp against odds ratio, with its thresholds."""
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))
    energy = _energy_cosine(a, table, eps)
    _overlay(a, table["c_f"], energy, [
        (table["spatial_set"], "spatial set", SPATIAL_SET_STYLE),
        (table["ocr_candidate"] & table["adapted"], "OCR candidates among adapted",
         OCR_CANDIDATE_STYLE),
        (table["ocr_set"], "OCR set", OCR_SET_STYLE),
    ])
    axes_note(a, _empty_notes(table, "ocr"))
    a.set_title("(a) OCR features among adapted units")
    a.legend(fontsize=7, loc="lower left")
    _mark(b, table["delta_p_ocr"], table["or_ocr"], "all features", **ALL_STYLE)
    _overlay(b, table["delta_p_ocr"], table["or_ocr"], [
        (table["ocr_candidate"], "OCR candidates", OCR_CANDIDATE_STYLE),
        (table["ocr_set"], "OCR set", OCR_SET_STYLE),
    ])
    b.axvline(thresholds["min_delta_p"], color="0.3", ls="--", lw=0.8, label="thresholds")
    b.axhline(thresholds["min_odds_ratio"], color="0.3", ls="--", lw=0.8)
    b.set_yscale("log")
    b.set_xlabel(r"$\Delta p_f$ = $p_f$(D_ocr) − $p_f$(D_base)")
    b.set_ylabel("odds ratio $OR_f$ (log, Haldane–Anscombe smoothed)")
    b.set_title("(b) OCR distribution shift")
    b.legend(fontsize=7, loc="lower right")
    fig.suptitle("Distribution of OCR features")
    fig.tight_layout()
    return fig
