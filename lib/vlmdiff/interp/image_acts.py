"""A feature's own activation at each image token, laid out on the patch grid, for drawing over
the picture beside the heads' attention."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from vlmdiff.hooks import replace_layer_output
from vlmdiff.inputs import encode_rows, to_device


@torch.no_grad()
def image_token_activations(
    model: torch.nn.Module,
    processor: Any,
    images: Sequence[Any],
    questions: Sequence[str],
    layer: int,
    feature: int,
    sae: Any,
    *,
    device: torch.device,
    batch_size: int = 16,
) -> np.ndarray:
    """`[n, grid, grid]`: the SAE feature's activation on the output of decoder block `layer`
    at every image token of each (image, question), encoded as for the activation caches,
    laid out on the patch grid (row-major, as the image tokens are)."""
    from datasets import Dataset

    image_id = model.config.image_token_id
    ds = Dataset.from_dict({"question": list(questions), "image": list(images)})
    current: dict[str, torch.Tensor] = {}

    def record(h: torch.Tensor) -> torch.Tensor:
        codes = sae.dense_acts(h[current["mask"]].to(sae.dtype))
        current["acts"] = codes[:, feature]
        return h

    rows: list[np.ndarray] = []
    with replace_layer_output(model, layer, record):
        for lo in range(0, len(ds), batch_size):
            inputs = to_device(encode_rows(ds, lo, min(lo + batch_size, len(ds)), mode="vqa",
                                           processor=processor), device, model.dtype)
            mask = (inputs["input_ids"] == image_id) & inputs["attention_mask"].bool()
            current["mask"] = mask
            model.model(**inputs, use_cache=False)
            counts = mask.sum(dim=1).tolist()
            rows += [a.float().cpu().numpy() for a in current["acts"].split(counts)]
    grid = int(round(len(rows[0]) ** 0.5)) if rows else 0
    if any(len(r) != grid * grid for r in rows):
        raise ValueError(f"image tokens per sample {sorted({len(r) for r in rows})} do not "
                         "fill a square patch grid")
    return np.stack([r.reshape(grid, grid) for r in rows]) if rows else np.zeros((0, 0, 0))
