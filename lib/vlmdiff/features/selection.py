"""Stages 2–3 of the method: per-feature statistics, the adapted set, the spatial and OCR sets.

Three steps, kept apart so that a threshold reaches only the step that uses it:

1. `vlmdiff.features.stats` streams the VLM's activation caches of `val` (D_base), `spatial`
   (D_sp) and `ocr` (D_ocr) through one layer's adapted SAE, one store chunk at a time, and
   keeps running sums only: firing counts and squared activations per feature and token
   type, and each feature's top-activating samples. No threshold enters here.
2. `feature_statistics` turns the sums of all layers into one row per (layer, feature): decoder
   cosine `c_f`, visual energy `E_v`, firing frequencies `p_f`, `Δp_f` and the odds ratio with
   its confidence interval. Still no threshold.
3. `select_features` applies the thresholds: the adapted set (`E_v > ε` and `c_f` in the bottom
   `p_cos` percent, the percentile taken over all features of all layers), spatial and OCR
   candidates (`Δp_f` and `OR_f` above thresholds), the lexical filter's verdicts, and the sets
   and chosen subsets built from them. `threshold_sweep` and `ground_truth` read its table.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from statistics import NormalDist
from typing import Any

import numpy as np
import pandas as pd
import xarray as xr

from vlmdiff.files import write_table
from vlmdiff.logs import Log

BASE_SPLIT = "val"
CONTRASTS = ("spatial", "ocr")
SPLITS = (BASE_SPLIT, *CONTRASTS)
TOKEN_TYPES = ("text", "image")
FREQUENCY_TOKENS = ("text", "image", "full")
COUNT_VARIABLES = ("n_fire", "sum_sq", "n_tokens", "n_samples")
# the lexical filter's table (vlmdiff.features.lexical) and its dtypes
LEXICAL_COLUMNS = {
    "layer": "int64",
    "feature": "int64",
    "n_samples": "int64",
    "n_prompts": "int64",
    "original_rate": "float64",
    "pass_rate": "float64",
    "passed": "bool",
}


# ------------------------------------------------------------------------- reading statistics


def read_verdicts(path: str | Path) -> pd.DataFrame:
    """A lexical-filter table written by the workflow, with its dtypes (also when empty)."""
    return pd.read_csv(path, dtype=LEXICAL_COLUMNS)


def read_statistics(
    paths: Sequence[str | Path], variables: Sequence[str] = COUNT_VARIABLES
) -> xr.Dataset:
    """The per-layer statistics files, `variables` only, stacked along `layer`."""
    parts = []
    for p in paths:
        with xr.open_dataset(p) as ds:
            parts.append(ds[list(variables)].load())
    return xr.concat(parts, dim="layer").sortby("layer")


def top_samples(
    paths: Sequence[str | Path], split: str, features: pd.DataFrame, n: int
) -> dict[tuple[int, int], np.ndarray]:
    """The first `n` top-activating samples (rows of `split`) of each (layer, feature) asked."""
    out: dict[tuple[int, int], np.ndarray] = {}
    wanted = features.groupby("layer")["feature"].apply(list).to_dict()
    for p in paths:
        with xr.open_dataset(p) as ds:
            layer = int(ds["layer"])
            if layer not in wanted:
                continue
            top = ds["top_sample"].sel(split=split).isel(rank=slice(0, n))
            rows = top.isel(feature=wanted[layer]).values
        for j, f in enumerate(wanted[layer]):
            out[(layer, int(f))] = rows[:, j][rows[:, j] >= 0]
    return out


# ------------------------------------------------------------------------- per-feature table


def odds_ratio(
    k1: np.ndarray,
    n1: np.ndarray,
    k0: np.ndarray,
    n0: np.ndarray,
    *,
    smoothing: float = 0.5,
    ci_level: float = 0.95,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Odds ratio of firing in split 1 vs split 0, with a Wald interval on the log scale.

    Every cell of the 2x2 table (fired / did not fire x split) gets `smoothing` added
    (Haldane–Anscombe, 0.5), so zero counts give finite values. A table with no information —
    the feature never fires, or fires on every token, in both splits — gets OR = 1 and the
    interval [0, inf]. Returns (OR, lower, upper).
    """
    k1, n1, k0, n0 = (np.asarray(v, dtype=np.float64) for v in (k1, n1, k0, n0))
    a, b = k1 + smoothing, n1 - k1 + smoothing
    c, d = k0 + smoothing, n0 - k0 + smoothing
    z = NormalDist().inv_cdf(0.5 + ci_level / 2)
    with np.errstate(divide="ignore", invalid="ignore"):  # only without smoothing
        log_or = np.log(a) - np.log(b) - np.log(c) + np.log(d)
        half_width = z * np.sqrt(1 / a + 1 / b + 1 / c + 1 / d)
    empty = ((k1 == 0) & (k0 == 0)) | ((k1 == n1) & (k0 == n0))
    ratio = np.where(empty, 1.0, np.exp(log_or))
    low = np.where(empty, 0.0, np.exp(log_or - half_width))
    high = np.where(empty, np.inf, np.exp(log_or + half_width))
    return ratio, low, high


def firing_counts(stats: xr.Dataset, tokens: str) -> tuple[xr.DataArray, xr.DataArray]:
    """Firing and token counts per (split, layer, feature) over `tokens` (text/image/full)."""
    if tokens not in FREQUENCY_TOKENS:
        raise ValueError(f"frequency tokens must be one of {FREQUENCY_TOKENS}, got {tokens!r}")
    if tokens == "full":
        return stats["n_fire"].sum("token_type"), stats["n_tokens"].sum("token_type")
    return stats["n_fire"].sel(token_type=tokens), stats["n_tokens"].sel(token_type=tokens)


def feature_statistics(
    stats: xr.Dataset,
    cosine: xr.DataArray | None,
    *,
    tokens: str = "text",
    smoothing: float = 0.5,
    ci_level: float = 0.95,
) -> pd.DataFrame:
    """One row per (layer, feature): `c_f`, `E_v`, `p_f` per split, `Δp_f` and `OR_f` per contrast.

    `stats` as from `read_statistics`; `cosine` the decoder cosine of the scored regime
    (layer, feature), or None (`c_f` is then NaN). `E_v` is the mean of `h_f^2` over the text
    tokens of D_base (VQA with the image present); `E_v_image` the same over its image tokens.
    `p_f` counts `tokens` (see `firing_counts`); `OR_f` is smoothed as in `odds_ratio`.
    """
    missing = [s for s in SPLITS if s not in stats["split"].values]
    if missing:
        raise ValueError(f"feature statistics lack split(s) {missing}")
    layers = stats["layer"].values
    if cosine is None:
        cosine = xr.full_like(stats["n_fire"].isel(split=0, token_type=0), np.nan, float)
    cos = cosine.sel(layer=layers).transpose("layer", "feature")
    if cos.shape != (len(layers), stats.sizes["feature"]):
        raise ValueError(
            f"decoder cosine has {cos.shape} (layer, feature) but the statistics have "
            f"{(len(layers), stats.sizes['feature'])}"
        )
    base = stats.sel(split=BASE_SPLIT)
    fire, n = firing_counts(stats, tokens)
    with np.errstate(invalid="ignore", divide="ignore"):
        energy = base["sum_sq"] / base["n_tokens"]
        p = fire / n
    columns = {
        "c_f": cos,
        "E_v": energy.sel(token_type="text"),
        "E_v_image": energy.sel(token_type="image"),
        **{f"p_{s}": p.sel(split=s) for s in SPLITS},
    }
    # scalar coordinates left by .sel (split, token_type, regime) would clash when merged
    grid = xr.Dataset({k: v.reset_coords(drop=True) for k, v in columns.items()})
    k0, n0 = xr.broadcast(fire.sel(split=BASE_SPLIT), n.sel(split=BASE_SPLIT))
    for c in CONTRASTS:
        grid[f"delta_p_{c}"] = grid[f"p_{c}"] - grid[f"p_{BASE_SPLIT}"]
        k1, n1 = xr.broadcast(fire.sel(split=c), n.sel(split=c))
        ratio, low, high = odds_ratio(
            k1.values, n1.values, k0.values, n0.values, smoothing=smoothing, ci_level=ci_level
        )
        for suffix, values in (("", ratio), ("_low", low), ("_high", high)):
            grid[f"or_{c}{suffix}"] = (k1.dims, values)
    grid = grid.transpose("layer", "feature")
    return grid.to_dataframe().reset_index()[["layer", "feature", *grid.data_vars]]


# ------------------------------------------------------------------------- selection


def cosine_threshold(c_f: np.ndarray, p_cos: float) -> float:
    """The `p_cos`-th percentile of `c_f` over every feature given (NaNs ignored; numpy's
    linear interpolation), so `c_f <= threshold` is "in the bottom `p_cos` percent"."""
    c_f = np.asarray(c_f, dtype=np.float64)
    if not np.isfinite(c_f).any():
        return float("nan")
    return float(np.nanpercentile(c_f, p_cos))


def adapted_mask(table: pd.DataFrame, p_cos: float, eps: float) -> np.ndarray:
    """`E_v > eps` and `c_f` in the bottom `p_cos` percent of all rows of `table` (all layers)."""
    threshold = cosine_threshold(table["c_f"].to_numpy(), p_cos)
    return ((table["E_v"] > eps) & (table["c_f"] <= threshold)).to_numpy()


def candidate_mask(table: pd.DataFrame, contrast: str, cfg: Mapping[str, Any]) -> np.ndarray:
    """`Δp_f > min_delta_p` and `OR_f > min_odds_ratio` (and, if asked, the interval above 1)."""
    mask = (table[f"delta_p_{contrast}"] > cfg["min_delta_p"]) & (
        table[f"or_{contrast}"] > cfg["min_odds_ratio"]
    )
    if cfg.get("require_significant", False):
        mask &= table[f"or_{contrast}_low"] > 1
    return mask.to_numpy()


def candidates(table: pd.DataFrame, contrast: str, cfg: Mapping[str, Any]) -> pd.DataFrame:
    """The rows of `table` that are `contrast` candidates, strongest odds ratio first."""
    cols = ["layer", "feature", f"delta_p_{contrast}", f"or_{contrast}", f"or_{contrast}_low"]
    picked = table.loc[candidate_mask(table, contrast, cfg), cols]
    return picked.sort_values([f"or_{contrast}", f"delta_p_{contrast}"], ascending=False)


def select_features(
    table: pd.DataFrame,
    lexical: Mapping[str, pd.DataFrame],
    *,
    p_cos: float,
    eps: float,
    n_selected: int,
    contrasts: Mapping[str, Mapping[str, Any]],
    log: Log = print,
) -> pd.DataFrame:
    """Membership flags on the per-feature table.

    `adapted`; per contrast `c`: `{c}_candidate`, `{c}_lexical_pass_rate` (NaN where not
    tested), `{c}_lexical_pass`, `{c}_set` (candidate, passed, adapted) and `{c}_selected`
    with `{c}_rank` (the top `n_selected` of the set by odds ratio, then Δp).
    """
    out = table.copy()
    out["cos_threshold"] = cosine_threshold(out["c_f"].to_numpy(), p_cos)
    out["adapted"] = adapted_mask(out, p_cos, eps)
    for c in contrasts:
        out[f"{c}_candidate"] = candidate_mask(out, c, contrasts[c])
        verdict = lexical[c][["layer", "feature", "pass_rate", "passed"]].rename(
            columns={"pass_rate": f"{c}_lexical_pass_rate", "passed": f"{c}_lexical_pass"}
        )
        out = out.merge(verdict, on=["layer", "feature"], how="left")
        untested = out[f"{c}_candidate"] & out[f"{c}_lexical_pass"].isna()
        if untested.any():
            log(f"warning: {int(untested.sum())} {c} candidates have no lexical verdict; dropped")
        passed = out[f"{c}_lexical_pass"].astype("boolean").fillna(False)
        out[f"{c}_lexical_pass"] = passed.astype(bool)
        out[f"{c}_set"] = out[f"{c}_candidate"] & out[f"{c}_lexical_pass"] & out["adapted"]
        ranked = out[out[f"{c}_set"]].sort_values([f"or_{c}", f"delta_p_{c}"], ascending=False)
        rank = pd.Series(np.arange(1, len(ranked) + 1), index=ranked.index)
        out[f"{c}_rank"] = rank.reindex(out.index).astype("Int64")
        out[f"{c}_selected"] = (out[f"{c}_rank"] <= n_selected).fillna(False).astype(bool)
    return out


SELECTED_COLUMNS = ["layer", "feature", "c_f", "E_v", "p_val"]


def selected_table(table: pd.DataFrame, contrasts: Sequence[str]) -> pd.DataFrame:
    """The chosen subsets, one row per (contrast, feature), for downstream analyses."""
    parts = []
    for c in contrasts:
        rows = table[table[f"{c}_selected"]]
        part = rows[SELECTED_COLUMNS].assign(
            contrast=c,
            rank=rows[f"{c}_rank"].astype(int),
            p_contrast=rows[f"p_{c}"],
            delta_p=rows[f"delta_p_{c}"],
            odds_ratio=rows[f"or_{c}"],
            odds_ratio_low=rows[f"or_{c}_low"],
            lexical_pass_rate=rows[f"{c}_lexical_pass_rate"],
        )
        parts.append(part.sort_values("rank"))
    cols = [
        "contrast",
        "rank",
        *SELECTED_COLUMNS,
        "p_contrast",
        "delta_p",
        "odds_ratio",
        "odds_ratio_low",
        "lexical_pass_rate",
    ]
    return pd.concat(parts, ignore_index=True)[cols] if parts else pd.DataFrame(columns=cols)


def set_summary(table: pd.DataFrame, contrasts: Sequence[str]) -> pd.DataFrame:
    """How many features each set holds, with a note where a set is empty and why."""
    n = len(table)
    rows = [
        ("all features", np.ones(n, bool), "no features"),
        ("adapted", table["adapted"], "no feature has E_v > eps and c_f in the bottom p_cos %"),
    ]
    for c in contrasts:
        passed = table[f"{c}_candidate"] & table[f"{c}_lexical_pass"]
        rows += [
            (
                f"{c} candidates",
                table[f"{c}_candidate"],
                f"no feature has Δp and OR above the {c} thresholds",
            ),
            (
                f"{c} candidates passing the lexical filter",
                passed,
                f"no {c} candidate kept firing under the neutral prompts",
            ),
            (
                f"{c} set",
                table[f"{c}_set"],
                f"no {c} candidate that passed the lexical filter is adapted",
            ),
            (f"{c} selected", table[f"{c}_selected"], f"the {c} set is empty (or n_selected is 0)"),
        ]
    out = []
    for name, mask, why in rows:
        count = int(np.asarray(mask).sum())
        note = f"EMPTY: {why}" if count == 0 else ""
        fraction = count / n if n else float("nan")
        out.append({"set": name, "n_features": count, "fraction": fraction, "note": note})
    return pd.DataFrame(out)


def per_layer_summary(table: pd.DataFrame, contrasts: Sequence[str]) -> pd.DataFrame:
    """Per layer: feature count, adapted count, mean cosine of all and of adapted features."""
    g = table.groupby("layer")
    out = pd.DataFrame(
        {
            "n_features": g.size(),
            "n_adapted": g["adapted"].sum(),
            "mean_cos_all": g["c_f"].mean(),
            "mean_cos_adapted": table[table["adapted"]].groupby("layer")["c_f"].mean(),
        }
    )
    for c in contrasts:
        out[f"n_{c}_set"] = g[f"{c}_set"].sum()
    return out.reset_index()


# ------------------------------------------------------------------------- threshold sweep


def threshold_sweep(
    table: pd.DataFrame,
    p_cos_grid: Sequence[float],
    eps_grid: Sequence[float],
    *,
    p_cos: float,
    eps: float,
) -> pd.DataFrame:
    """Adapted-set size, Jaccard overlap with the operating point and per-layer count
    correlation (Pearson) for every (p_cos, eps) on the grid; the operating point is added."""
    p_grid = sorted({*map(float, p_cos_grid), float(p_cos)})
    e_grid = sorted({*map(float, eps_grid), float(eps)})
    reference = adapted_mask(table, p_cos, eps)
    layers = table["layer"].to_numpy()
    ref_counts = pd.Series(reference).groupby(layers).sum()
    rows = []
    for pc in p_grid:
        for e in e_grid:
            mask = adapted_mask(table, pc, e)
            union = int((mask | reference).sum())
            counts = pd.Series(mask).groupby(layers).sum()
            corr = float("nan")
            if counts.std() > 0 and ref_counts.std() > 0:
                corr = float(np.corrcoef(counts, ref_counts)[0, 1])
            rows.append(
                {
                    "p_cos": pc,
                    "eps": e,
                    "n_selected": int(mask.sum()),
                    "fraction": float(mask.mean()) if len(mask) else float("nan"),
                    "jaccard": int((mask & reference).sum()) / union if union else float("nan"),
                    "layer_count_corr": corr,
                    "operating_point": math.isclose(pc, p_cos) and math.isclose(e, eps),
                }
            )
    return pd.DataFrame(rows)


# ------------------------------------------------------------------------- workflow jobs


def select_features_job(
    *,
    stats_paths: Sequence[str | Path],
    cosine_path: str | Path,
    lexical_paths: Sequence[str | Path],
    contrasts: Sequence[str],
    thresholds: Mapping[str, Mapping[str, Any]],
    regime: str,
    frequency: Mapping[str, Any],
    p_cos: float,
    eps: float,
    n_selected: int,
    out: Mapping[str, str | Path],
    log: Log = print,
) -> dict[str, pd.DataFrame]:
    """The `select_features` rule: the feature table with every flag (`out["features_parquet"]`,
    `out["features_csv"]`), the chosen subsets (`selected_parquet`, `selected_csv`), the set
    sizes with notes on empty sets (`sets`) and the per-layer summary behind figure 7
    (`per_layer`). `lexical_paths` are the lexical-filter tables of `contrasts`, in order;
    `thresholds` has each contrast's section."""
    lexical = {c: read_verdicts(path) for c, path in zip(contrasts, lexical_paths, strict=True)}
    sections = {c: thresholds[c] for c in contrasts}
    with xr.open_dataarray(cosine_path) as cos:
        if regime not in cos["regime"].values:
            raise ValueError(
                f"{cosine_path} has no regime {regime!r} (features.regime); it has "
                f"{list(cos['regime'].values)}: add it to sae.regimes"
            )
        cosine = cos.sel(regime=regime).load()
    table = feature_statistics(read_statistics(stats_paths), cosine, **frequency)
    table = select_features(
        table, lexical, p_cos=p_cos, eps=eps, n_selected=n_selected, contrasts=sections, log=log
    )
    sets = set_summary(table, list(sections))
    log("\n" + sets.to_string(index=False))
    for note in sets["note"][sets["note"] != ""]:
        log(f"warning: {note}")
    tables = {
        "features": table,
        "selected": selected_table(table, list(sections)),
        "sets": sets,
        "per_layer": per_layer_summary(table, list(sections)),
    }
    for name in ("features", "selected"):
        write_table(tables[name], out[f"{name}_parquet"])
        write_table(tables[name], out[f"{name}_csv"])
    write_table(tables["sets"], out["sets"])
    write_table(tables["per_layer"], out["per_layer"])
    return tables


def threshold_sweep_job(
    *,
    table_path: str | Path,
    sweep: Mapping[str, Sequence[float]],
    p_cos: float,
    eps: float,
    out: Mapping[str, str | Path],
    log: Log = print,
) -> pd.DataFrame:
    """The `threshold_sweep` rule: `threshold_sweep` of the feature table over the grids of
    the `features.sweep` section (`p_cos`, `eps`), logged and written to `out["table"]`."""
    table = pd.read_parquet(table_path)
    result = threshold_sweep(table, sweep["p_cos"], sweep["eps"], p_cos=p_cos, eps=eps)
    log("\n" + result.to_string(index=False))
    write_table(result, out["table"])
    return result


def feature_figures_job(
    *,
    table_path: str | Path,
    per_layer_path: str | Path,
    sweep_path: str | Path,
    p_cos: float,
    eps: float,
    thresholds: Mapping[str, Mapping[str, Any]],
    out: Mapping[str, str | Path],
    log: Log = print,
) -> None:
    """The `feature_figures` rule: figures 2, 7, 8, 9 and 10 (`out["fig2"]`, ..., each with a
    `_pdf`) from the feature table, the per-layer summary and the threshold sweep."""
    from vlmdiff.plots import (
        fig2_feature_selection,
        fig7_adapted_per_layer,
        fig8_threshold_sweep,
        fig9_firing_frequency,
        fig10_ocr_features,
        save,
    )

    table = pd.read_parquet(table_path)
    save(fig2_feature_selection(table, eps, p_cos), out["fig2"], out["fig2_pdf"])
    save(fig7_adapted_per_layer(pd.read_csv(per_layer_path)), out["fig7"], out["fig7_pdf"])
    save(fig8_threshold_sweep(pd.read_csv(sweep_path)), out["fig8"], out["fig8_pdf"])
    save(fig9_firing_frequency(table), out["fig9"], out["fig9_pdf"])
    save(fig10_ocr_features(table, eps, thresholds["ocr"]), out["fig10"], out["fig10_pdf"])
    log(f"figures 2, 7, 8, 9, 10 from {len(table)} features")
