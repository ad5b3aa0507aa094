"""Ground truth for the selected features: how often a feature's top-activating samples are
truly spatial (OCR) questions in the drawn world, against random adapted features and the
base rate. A check the paper could not make.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import xarray as xr

from vlmdiff.features.selection import BASE_SPLIT, top_samples
from vlmdiff.files import write_table
from vlmdiff.logs import Log

# ------------------------------------------------------------------------- ground truth


def top_sample_truth(samples: np.ndarray, meta: pd.DataFrame, family: str) -> dict[str, Any]:
    """Share of `samples` (rows of `meta`) whose question is of `family`, and the dominant
    relation among them."""
    if len(samples) == 0:
        return {
            "n_samples": 0,
            "precision": float("nan"),
            "dominant_relation": "",
            "dominant_share": float("nan"),
        }
    rows = meta.iloc[samples]
    hits = rows[rows["family"] == family]
    relations = hits["relation"].replace("", np.nan).dropna().value_counts()
    return {
        "n_samples": len(rows),
        "precision": len(hits) / len(rows),
        "dominant_relation": str(relations.index[0]) if len(relations) else "",
        "dominant_share": float(relations.iloc[0] / len(hits)) if len(relations) else float("nan"),
    }


def ground_truth(
    table: pd.DataFrame,
    samples: Mapping[tuple[int, int], np.ndarray],
    meta: pd.DataFrame,
    contrasts: Sequence[str],
    *,
    n_random: int,
    seed: int,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Are a set's features about what they are said to be? We drew the world, so we know.

    For every feature of each contrast's set and candidate list, and for `n_random` random
    adapted features outside the set: the share of its top-activating D_base samples whose
    question truly is of the contrast's family, and the dominant relation. Returns the
    per-feature rows and a summary per group, with the family's base rate in D_base.
    `samples` maps (layer, feature) to rows of `meta` (the val split's `family`, `relation`).
    """
    rng = np.random.default_rng(seed)
    rows = []
    for c in contrasts:
        groups = {
            f"{c} set": table[table[f"{c}_set"]],
            f"{c} candidates": table[table[f"{c}_candidate"]],
        }
        pool = table[table["adapted"] & ~table[f"{c}_set"]]
        pick = rng.choice(len(pool), size=min(n_random, len(pool)), replace=False)
        groups[f"random adapted (for {c})"] = pool.iloc[np.sort(pick)]
        for group, feats in groups.items():
            for layer, feature in zip(feats["layer"], feats["feature"], strict=True):
                key = (int(layer), int(feature))
                truth = top_sample_truth(samples.get(key, np.zeros(0, int)), meta, c)
                rows.append(
                    {"contrast": c, "group": group, "layer": key[0], "feature": key[1], **truth}
                )
    cols = [
        "contrast",
        "group",
        "layer",
        "feature",
        "n_samples",
        "precision",
        "dominant_relation",
        "dominant_share",
    ]
    per_feature = pd.DataFrame(rows, columns=cols)
    summary = []
    for c in contrasts:
        base_rate = float((meta["family"] == c).mean()) if len(meta) else float("nan")
        for group in (f"{c} set", f"{c} candidates", f"random adapted (for {c})"):
            part = per_feature[(per_feature["group"] == group)]
            scored = part[part["n_samples"] > 0]
            relations = scored["dominant_relation"].replace("", np.nan).dropna().value_counts()
            summary.append(
                {
                    "contrast": c,
                    "group": group,
                    "n_features": len(part),
                    "mean_precision": scored["precision"].mean() if len(scored) else float("nan"),
                    "median_precision": scored["precision"].median()
                    if len(scored)
                    else float("nan"),
                    "base_rate": base_rate,
                    "most_common_dominant_relation": str(relations.index[0])
                    if len(relations)
                    else "",
                    "note": "" if len(scored) else "EMPTY: no feature in this group",
                }
            )
    return per_feature, pd.DataFrame(summary)


def ground_truth_job(
    *,
    table_path: str | Path,
    stats_paths: Sequence[str | Path],
    val_path: str | Path,
    contrasts: Sequence[str],
    n_random: int,
    seed: int,
    out: Mapping[str, str | Path],
    log: Log = print,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The `ground_truth` rule: `ground_truth` on the D_base top-activating samples; the
    tables to `out["per_feature"]` and `out["summary"]`."""
    table = pd.read_parquet(table_path)
    meta = pd.read_parquet(val_path, columns=["family", "relation"])
    wanted = table["adapted"].copy()
    for c in contrasts:
        wanted |= table[f"{c}_candidate"]
    with xr.open_dataset(stats_paths[0]) as first:
        n_top = first.sizes["rank"]
    samples = top_samples(stats_paths, BASE_SPLIT, table[wanted], n_top)
    per_feature, summary = ground_truth(
        table, samples, meta, contrasts, n_random=n_random, seed=seed
    )
    log("\n" + summary.to_string(index=False))
    write_table(per_feature, out["per_feature"])
    write_table(summary, out["summary"])
    return per_feature, summary
