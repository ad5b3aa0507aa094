"""Reading attribution scores per head: head and feature labels, one feature's `[layer, head]` map, rankings.

Kept apart from `attribution` (which needs torch and the models) so that the jobs that only
read the scores and draw start quickly.
"""

from __future__ import annotations

import numpy as np
import xarray as xr


def head_label(layer: int, head: int) -> str:
    return f"L{layer}H{head}"


def feature_label(layer: int, feature: int) -> str:
    return f"L{layer}F{feature}"


def feature_head_scores(ds: xr.Dataset, feature: str, method: str, variant: str) -> xr.DataArray:
    """A feature's `[layer, head]` scores of one method and variant, up to its own layer."""
    layer = int(ds["feature_layer"].sel(feature=feature))
    return ds["score"].sel({"feature": feature, "method": method, "variant": variant}).isel(
        layer=slice(0, layer + 1)
    )


def ranked_heads(scores: xr.DataArray, n: int, *, bottom: bool = False) -> list[tuple[int, int]]:
    """The `n` heads with the largest (`bottom`: smallest) |score| of a `[layer, head]` map,
    among the layers up to the feature's own (later heads cannot reach it)."""
    flat = abs(scores).stack(pair=("layer", "head"))
    order = np.argsort(flat.values, kind="stable")
    order = order if bottom else order[::-1]
    pairs = [(int(flat["layer"].values[i]), int(flat["head"].values[i])) for i in order]
    return pairs[:n]
