"""Tables 1 and 2 of the paper from the ablation runs: mean ± std over seeds, as CSV, markdown
and LaTeX.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import pandas as pd

TABLE1 = {
    "Layer": "layer", "Feature": "feature_index", "Δ VSR Acc": "d_vsr_acc",
    "Δ VQA Acc": "d_vqa_acc", "Δ Ctrl": "d_ctrl", "VSR Relations": "vsr_relations",
    "VSR OR": "vsr_or",
}
TABLE2 = {
    "Layer": "layer", "Feature": "feature_index", "Δ VSR Acc": "d_vsr_acc",
    "Δ VSR Prob": "d_vsr_prob", "Δ VQA Acc": "d_vqa_acc", "Δ Ctrl": "d_ctrl",
    "Δ Ctrl (VQA)": "d_ctrl_vqa", "VSR OR": "vsr_or", "#Samples": "n_vsr",
    "VSR Relations": "vsr_relations",
}


RUN_COLUMNS = [
    "feature", "layer", "feature_index", "seed", "vsr_relations", "n_vsr", "n_vqa", "vsr_acc",
    "vsr_acc_ablated", "vsr_prob", "vsr_prob_ablated", "vqa_acc", "vqa_acc_ablated",
    "d_vsr_acc", "d_vsr_prob", "d_vqa_acc", "d_ctrl", "d_ctrl_vqa", "controls", "vsr_or",
]
METRICS = ["d_vsr_acc", "d_vsr_prob", "d_vqa_acc", "d_ctrl", "d_ctrl_vqa"]


def summarise(runs: pd.DataFrame) -> pd.DataFrame:
    """Mean and spread (std over seeds) per feature, ranked by Δ VSR accuracy (worst first)."""
    keys = ["feature", "layer", "feature_index", "vsr_relations", "vsr_or"]
    cols = [*keys, "n_vsr", "n_vqa", "n_seeds"]
    for m in METRICS:
        cols += [f"{m}_mean", f"{m}_std"]
    if runs.empty:
        return pd.DataFrame(columns=cols)
    grouped = runs.groupby(keys, dropna=False, sort=False)
    out = grouped.agg(
        n_vsr=("n_vsr", "mean"), n_vqa=("n_vqa", "mean"), n_seeds=("seed", "nunique"),
        **{f"{m}_mean": (m, "mean") for m in METRICS},
        **{f"{m}_std": (m, lambda s: float(s.std(ddof=1)) if len(s) > 1 else 0.0)
           for m in METRICS},
    ).reset_index()
    return out.sort_values("d_vsr_acc_mean", kind="stable").reset_index(drop=True)[cols]


def paper_table(summary: pd.DataFrame, columns: Mapping[str, str]) -> pd.DataFrame:
    """Display table: `mean ± std` strings for the metrics (points; probability as is)."""
    out = {}
    for name, col in columns.items():
        if col in METRICS:
            digits = 3 if col == "d_vsr_prob" else 2
            out[name] = [f"{m:.{digits}f} ± {s:.{digits}f}"
                         for m, s in zip(summary[f"{col}_mean"], summary[f"{col}_std"],
                                         strict=True)]
        elif col == "vsr_or":
            out[name] = [f"{v:.2f}" for v in summary[col]]
        elif col == "n_vsr":
            out[name] = [str(int(round(v))) for v in summary[col]]
        else:
            out[name] = summary[col].astype(str).tolist()
    return pd.DataFrame(out, columns=list(columns))


def markdown(table: pd.DataFrame, caption: str, empty_note: str) -> str:
    """A GitHub Markdown table with a caption line (the note instead of rows when empty)."""
    lines = [f"**{caption}**", ""]
    lines.append("| " + " | ".join(table.columns) + " |")
    lines.append("|" + "|".join(" --- " for _ in table.columns) + "|")
    for row in table.itertuples(index=False):
        lines.append("| " + " | ".join(str(v) for v in row) + " |")
    if table.empty:
        lines += ["", empty_note]
    return "\n".join(lines) + "\n"


def latex(table: pd.DataFrame, caption: str, label: str, empty_note: str) -> str:
    """A booktabs LaTeX table (`±` and `Δ` as math)."""

    def esc(s: str) -> str:
        s = str(s).replace("&", r"\&").replace("%", r"\%").replace("#", r"\#").replace("_", r"\_")
        return s.replace("±", r"$\pm$").replace("Δ", r"$\Delta$")

    spec = "l" * len(table.columns)
    lines = [r"\begin{table}[t]", r"\centering", r"\small", rf"\begin{{tabular}}{{{spec}}}",
             r"\toprule", " & ".join(esc(c) for c in table.columns) + r" \\", r"\midrule"]
    for row in table.itertuples(index=False):
        lines.append(" & ".join(esc(v) for v in row) + r" \\")
    if table.empty:
        lines.append(rf"\multicolumn{{{len(table.columns)}}}{{l}}{{{esc(empty_note)}}} \\")
    lines += [r"\bottomrule", r"\end{tabular}", rf"\caption{{{esc(caption)}}}",
              rf"\label{{{label}}}", r"\end{table}"]
    return "\n".join(lines) + "\n"


EMPTY_NOTE = ("EMPTY: no selected feature to ablate (tables/selected_features has no row of "
              "this contrast, or no feature fired on VSR); see tables/feature_sets.csv")


def write_ablation_tables(runs: pd.DataFrame, out: Mapping[str, str | Path], contrast: str) -> None:
    """Tables 1 and 2 (CSV with mean and std columns, Markdown, LaTeX) from the per-seed runs.

    `out` has keys `runs`, `table1_{csv,md,tex}` and `table2_{csv,md,tex}`."""
    from vlmdiff.files import atomic_path, write_table

    summary = summarise(runs)
    write_table(runs, out["runs"])
    seeds = ", ".join(str(s) for s in sorted(runs["seed"].unique())) if len(runs) else "none"
    captions = {
        "table1": f"Top ablated {contrast} SAE features ranked by VSR accuracy drop (points, "
        f"mean ± std over seeds {seeds}); Δ Ctrl: same-layer random features; VSR OR: odds "
        "ratio under the distribution shift.",
        "table2": f"Full ablation results for the {contrast} features (mean ± std over seeds "
        f"{seeds}): accuracy drops in points, probability of the correct answer as is, "
        "number of VSR samples per seed, relation-specific VSR subsets.",
    }
    for name, columns in (("table1", TABLE1), ("table2", TABLE2)):
        cols = ["feature", "layer", "feature_index", "vsr_relations", "vsr_or", "n_vsr",
                "n_vqa", "n_seeds"] if name == "table2" else ["feature", "layer",
                                                                "feature_index", "vsr_relations",
                                                                "vsr_or", "n_seeds"]
        metrics = [c for c in summary.columns
                   if c not in cols and c.rsplit("_", 1)[0] in columns.values()]
        write_table(summary[cols + metrics], out[f"{name}_csv"])
        shown = paper_table(summary, columns)
        texts = {
            "md": markdown(shown, captions[name], EMPTY_NOTE),
            "tex": latex(shown, captions[name], f"tab:{name}_ablation", EMPTY_NOTE),
        }
        for ext, text in texts.items():
            with atomic_path(out[f"{name}_{ext}"]) as tmp:
                tmp.write_text(text, encoding="utf-8")
