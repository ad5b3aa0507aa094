"""What the causal jobs share: the VLM, the selected features, their SAEs and directions."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from vlmdiff.causal.heads import feature_label
from vlmdiff.logs import Log

# ------------------------------------------------------------------------- workflow jobs


def causal_features(selected_path: str | Path, contrast: str, max_features: int) -> pd.DataFrame:
    """The selected features of `contrast` the causal experiments study, best rank first."""
    table = pd.read_parquet(selected_path)
    table = table[table["contrast"] == contrast].sort_values("rank")
    return table.head(max_features).reset_index(drop=True)


class CausalContext:
    """What the causal jobs share: the VLM, the features, their directions and top samples."""

    def __init__(
        self,
        vlm_dir: str | Path,
        selected_path: str | Path,
        sae_dirs: Mapping[int, str | Path],
        *,
        contrast: str,
        max_features: int,
        device: str,
        log: Log = print,
    ) -> None:
        from vlmdiff.models.build import load_vlm, resolve_device
        from vlmdiff.sae.topk import TopKSAE

        self.device = resolve_device(device)
        self.features = causal_features(selected_path, contrast, max_features)
        self.log = log
        log(f"{len(self.features)} {contrast} feature(s) selected for causal experiments")
        self.model, self.processor = load_vlm(Path(vlm_dir), self.device)
        self.directions: dict[tuple[int, int], torch.Tensor] = {}
        self.saes: dict[int, Any] = {}
        for layer in sorted(self.features["layer"].unique()):
            self.saes[int(layer)] = TopKSAE.load(sae_dirs[int(layer)], device=self.device)
        for layer, f in self.keys():
            self.directions[(layer, f)] = self.saes[layer].feature_directions()[f].float()

    def keys(self) -> list[tuple[int, int]]:
        return [(int(a), int(b)) for a, b in zip(self.features["layer"], self.features["feature"],
                                                  strict=True)]

    def labels(self) -> list[str]:
        return [feature_label(*k) for k in self.keys()]


def feature_coords(ctx: CausalContext) -> dict[str, Any]:
    """xarray coordinates along a "feature" dimension: its label, layer and index."""
    keys = ctx.keys()
    return {
        "feature": ctx.labels(),
        "feature_layer": ("feature", np.array([k[0] for k in keys], dtype=np.int64)),
        "feature_index": ("feature", np.array([k[1] for k in keys], dtype=np.int64)),
    }
