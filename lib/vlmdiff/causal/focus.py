"""Where a head looks: the share of its image attention that falls on the patches of the objects
a question names, against the share those patches would get from an even spread.

Needs the ground truth of the shapes world (each row's `scene`); rows without one (real VQAv2
or VSR) are skipped.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from vlmdiff.world.scenes import Scene

SUMMARY_COLUMNS = ["feature", "method", "rank", "layer", "head", "n", "share", "even", "lift",
                   "lift_ci_low", "lift_ci_high"]


def named_objects(question: str, scene: Scene) -> list[str]:
    """The scene's objects whose full name ("red circle") the question uses, in scene order."""
    text = question.lower()
    return [o.name for o in scene.objects if re.search(rf"\b{re.escape(o.name)}\b", text)]


def object_patches(scene: Scene, names: Sequence[str], grid: int) -> np.ndarray:
    """Bool `[grid, grid]`: the patches (row-major, as the image tokens) that the bounding
    boxes of the named objects overlap."""
    side = scene.image_size / grid
    mask = np.zeros((grid, grid), bool)
    for o in scene.objects:
        if o.name not in names:
            continue
        lo_x, hi_x = o.x - o.size / 2, o.x + o.size / 2
        lo_y, hi_y = o.y - o.size / 2, o.y + o.size / 2
        cols = range(max(0, math.floor(lo_x / side)), min(grid, math.ceil(hi_x / side)))
        rows = range(max(0, math.floor(lo_y / side)), min(grid, math.ceil(hi_y / side)))
        for r in rows:
            mask[r, list(cols)] = True
    return mask


def focus_rows(
    maps: np.ndarray, scenes: Sequence[str | None], questions: Sequence[str]
) -> list[dict[str, Any]]:
    """Per sample: the named objects, their patch count, the attention share on them and the
    even-spread share; `maps` is `[n, grid, grid]` attention to the image. Samples with no
    scene or no named object give no row."""
    out = []
    grid = maps.shape[-1]
    for i, (scene_json, q) in enumerate(zip(scenes, questions, strict=True)):
        if not scene_json:
            continue
        scene = Scene.from_dict(json.loads(scene_json))
        names = named_objects(q, scene)
        mask = object_patches(scene, names, grid)
        if not mask.any():
            continue
        total = float(maps[i].sum())
        share = float(maps[i][mask].sum()) / total if total > 0 else float("nan")
        even = float(mask.mean())
        out.append({"sample": i, "objects": ", ".join(names), "object_patches": int(mask.sum()),
                    "share": share, "even": even, "lift": share / even})
    return out


def focus_summary(rows: pd.DataFrame, n_boot: int = 1000, seed: int = 0) -> pd.DataFrame:
    """Per (feature, method, rank, head): mean share, mean even share, and the lift (mean share
    over mean even share) with a bootstrap 95 % interval over samples."""
    if rows.empty:
        return pd.DataFrame(columns=SUMMARY_COLUMNS)
    rng = np.random.default_rng(seed)
    out = []
    for key, part in rows.groupby(["feature", "method", "rank", "layer", "head"], sort=False):
        share, even = part["share"].to_numpy(), part["even"].to_numpy()
        idx = rng.integers(len(part), size=(n_boot, len(part)))
        boot = share[idx].mean(1) / even[idx].mean(1)
        lo, hi = np.quantile(boot, [0.025, 0.975])
        out.append(dict(zip(["feature", "method", "rank", "layer", "head"], key, strict=True),
                        n=len(part), share=share.mean(), even=even.mean(),
                        lift=share.mean() / even.mean(), lift_ci_low=lo, lift_ci_high=hi))
    return pd.DataFrame(out, columns=SUMMARY_COLUMNS)
