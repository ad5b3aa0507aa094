"""The auto-interp table (`autointerp_table` rule): RAW and OVERLAY records side by side, with
F1, delphi's detection and fuzzing scores and their intervals, in CSV, Markdown and a figure."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from vlmdiff.files import atomic_path, write_table
from vlmdiff.interp.autointerp import VARIANTS, read_records
from vlmdiff.interp.scoring import (
    balanced_accuracy_interval,
    classification_scores,
    mean_interval,
    paired_difference,
)
from vlmdiff.logs import Log

SCORES = {"detection": ("classification_results", None), "fuzzing": ("fuzzing_results", None),
          "detection_hard": ("classification_results", ("positive", "hard")),
          "fuzzing_hard": ("fuzzing_results", ("positive", "hard"))}
"""delphi's scores, each from the record's answers it is computed on and the kinds of sample
kept (None: all; the hard ones: the positives against the hard negatives alone)."""
TITLES = {"detection": "Detection", "fuzzing": "Fuzzing",
          "detection_hard": "Detection against hard negatives only",
          "fuzzing_hard": "Fuzzing against hard negatives only"}
TABLE_COLUMNS = ["feature", "layer", "index", "contrast", "rank", "variant", "status",
                 "description", "f1",
                 *[f"{name}{end}" for name in SCORES for end in ("", "_low", "_high")],
                 "precision", "recall", "tp", "fp", "fn", "tn", "model", "evidence",
                 "prompt_tokens", "completion_tokens", "calls", "error"]


def score_with_interval(record: Mapping[str, Any], results: str,
                        kinds: Sequence[str] | None = None
                        ) -> tuple[float | None, float | None, float | None]:
    """Class-balanced accuracy of one kind of a record's answers (`classification_results`:
    detection; `fuzzing_results`: fuzzing), of the samples of `kinds` only where given, with
    its 95% bootstrap interval (None where the record has none: not asked, failed, cached
    before fuzzing was asked, or no negative of those kinds)."""
    answers = record.get(results) or []
    if kinds is not None:
        answers = [c for c in answers if c.get("kind") in kinds]
        if not any(c["label"] == 0 for c in answers):
            answers = []
    if record.get("status") != "ok" or not answers:
        return None, None, None
    labels = [c["label"] for c in answers]
    preds = [c["prediction"] for c in answers]
    low, high = balanced_accuracy_interval(labels, preds)
    return float(classification_scores(labels, preds)["balanced_accuracy"]), low, high


def records_table(records: Sequence[Mapping[str, Any]]) -> pd.DataFrame:
    """One row per (feature, variant) record."""
    rows = []
    for r in records:
        row = {c: r.get(c) for c in TABLE_COLUMNS}
        row.update(r["usage"])
        row["evidence"] = "; ".join(r["evidence"])
        for name, (results, kinds) in SCORES.items():
            row[name], row[f"{name}_low"], row[f"{name}_high"] = score_with_interval(
                r, results, kinds)
        rows.append(row)
    table = pd.DataFrame(rows, columns=TABLE_COLUMNS)
    return table.sort_values(["contrast", "rank", "variant"], kind="stable").reset_index(drop=True)


def f1_comparison(table: pd.DataFrame) -> pd.DataFrame:
    """Per feature: RAW and OVERLAY F1 and descriptions side by side, and their difference."""
    scores = ["f1", *SCORES]
    wide = table.pivot(index=["contrast", "rank", "feature"], columns="variant", values=scores)
    wide = wide.reindex(columns=pd.MultiIndex.from_product([scores, VARIANTS]))
    wide.columns = [f"{score}_{v}" for score, v in wide.columns]
    wide = wide.reset_index()
    wide["f1_gain"] = wide["f1_overlay"] - wide["f1_raw"]
    for v in VARIANTS:
        d = table[table["variant"] == v].set_index("feature")["description"]
        wide[f"description_{v}"] = wide["feature"].map(d)
    return wide.sort_values(["contrast", "rank"]).reset_index(drop=True)


def markdown_table(wide: pd.DataFrame) -> str:
    """The RAW vs OVERLAY comparison as a markdown table with the mean F1 of each variant."""
    lines = ["| feature | contrast | F1 RAW | F1 OVERLAY | description (RAW) | description (OVERLAY) |",
             "| --- | --- | --- | --- | --- | --- |"]

    def num(v: Any) -> str:
        return "–" if v is None or pd.isna(v) else f"{v:.2f}"

    def text(v: Any) -> str:
        return "–" if v is None or pd.isna(v) else str(v).replace("|", "/")

    for _, r in wide.iterrows():
        lines.append(f"| {r['feature']} | {r['contrast']} | {num(r['f1_raw'])} | "
                     f"{num(r['f1_overlay'])} | {text(r['description_raw'])} | "
                     f"{text(r['description_overlay'])} |")
    if wide.empty:
        lines.append("| EMPTY: no selected features to describe | | | | | |")
    both = wide.dropna(subset=["f1_raw", "f1_overlay"])
    lines.append("")
    lines.append(f"Mean F1 over {len(both)} feature(s) with both variants: RAW "
                 f"{num(both['f1_raw'].mean() if len(both) else None)}, OVERLAY "
                 f"{num(both['f1_overlay'].mean() if len(both) else None)}.")
    for name in SCORES:
        both = wide.dropna(subset=[f"{name}_raw", f"{name}_overlay"])
        raw, overlay = both[f"{name}_raw"], both[f"{name}_overlay"]
        lines.append("")
        lines.append(f"{TITLES[name]} (class-balanced accuracy, chance 0.5; mean [95% bootstrap "
                     f"interval] over the {len(both)} feature(s) with both): RAW "
                     f"{mean_interval(raw).text()}, OVERLAY {mean_interval(overlay).text()}, "
                     f"OVERLAY - RAW {paired_difference(raw, overlay).text()} (paired).")
    return "\n".join(lines) + "\n"


def fig_autointerp_f1(wide: pd.DataFrame) -> Any:
    """F1 of each feature's RAW and OVERLAY description (lines join a feature's two points),
    with each variant's mean; the paper reports OVERLAY about +0.2 above RAW."""
    from vlmdiff.plots import axes_note, plt

    fig, ax = plt.subplots(figsize=(4.2, 3.4))
    ax.set_xticks([0, 1], ["RAW", "OVERLAY"])
    ax.set_xlim(-0.4, 1.4)
    ax.set_ylim(-0.05, 1.05)
    ax.set_ylabel("F1 of held-out classification")
    ax.set_title("Auto-interp: RAW vs OVERLAY", fontsize=10)
    both = wide.dropna(subset=["f1_raw", "f1_overlay"])
    for _, r in both.iterrows():
        ax.plot([0, 1], [r["f1_raw"], r["f1_overlay"]], color="0.6", lw=0.8, marker="o", ms=3)
    raw_only = wide[wide["f1_raw"].notna() & wide["f1_overlay"].isna()]
    ax.scatter(np.zeros(len(raw_only)), raw_only["f1_raw"], color="0.6", s=9,
               label="RAW only (no heat maps)" if len(raw_only) else None)
    for x, col in ((0, "f1_raw"), (1, "f1_overlay")):
        vals = wide[col].dropna()
        if len(vals):
            ax.hlines(vals.mean(), x - 0.25, x + 0.25, color="C3", lw=2.5)
            ax.text(x + 0.27, vals.mean(), f"{vals.mean():.2f}", va="center", fontsize=8,
                    color="C3")
    if wide[["f1_raw", "f1_overlay"]].notna().sum().sum() == 0:
        axes_note(ax, ["no F1: no feature was described and validated"])
    if len(raw_only):
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    return fig


def autointerp_table_job(
    *, raw_dir: str | Path, overlay_dir: str | Path, out: Mapping[str, str | Path],
    log: Log = print,
) -> pd.DataFrame:
    """The `autointerp_table` rule: RAW and OVERLAY records as one table (`out["table"]`),
    side by side in Markdown (`out["markdown"]`), and their F1 figure (`out["fig_autointerp"]`,
    `out["fig_autointerp_pdf"]`)."""
    from vlmdiff.plots import save

    table = records_table(read_records(raw_dir) + read_records(overlay_dir))
    wide = f1_comparison(table)
    write_table(table, out["table"])
    with atomic_path(out["markdown"]) as tmp:
        tmp.write_text(markdown_table(wide))
    save(fig_autointerp_f1(wide), out["fig_autointerp"], out["fig_autointerp_pdf"])
    for line in markdown_table(wide).splitlines()[-2 * len(SCORES) - 1:]:
        if line:
            log(line)
    return table
