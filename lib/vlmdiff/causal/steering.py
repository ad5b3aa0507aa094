"""Steering: adding a feature's direction at the ablation's positions, and the flip rates of
the answers it changes (against random same-layer features).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch

from vlmdiff.causal.ablation import (
    Edit,
    EvalInputs,
    EvalSettings,
    _EvalSetup,
    add_direction,
    control_pool,
    edit_positions,
)
from vlmdiff.causal.context import CausalContext, feature_label
from vlmdiff.causal.figures import fig_steering
from vlmdiff.files import write_table
from vlmdiff.hooks import replace_layer_output
from vlmdiff.inputs import row_batches
from vlmdiff.logs import Log, progress_line
from vlmdiff.plots import save

if TYPE_CHECKING:
    from datasets import Dataset


def steering(direction: torch.Tensor, alpha: float) -> Edit:
    return lambda span: add_direction(direction, alpha, span)


def steering_job(
    *,
    inputs: EvalInputs,
    settings: EvalSettings,
    vqa_samples: int,
    alphas: Sequence[float],
    seed: int,
    out: Mapping[str, str | Path],
    log: Log = print,
) -> pd.DataFrame:
    """The `steering` rule. Flip rate of the yes/no answer when `α·s·v` is added at the edited
    positions, where s is the mean norm of the block-L output there (so α is relative to the
    residual's size), on the relation subset and on VQA yes/no; a random same-layer feature as
    the control. The table to `out["table"]`, its figure to `out["steering"]` (and `_pdf`)."""
    setup = _EvalSetup(inputs, settings, log)
    ctx, vqa_pool = setup.ctx, setup.vqa_pool
    rng = np.random.default_rng(seed)
    vqa_rows = np.sort(rng.choice(vqa_pool, size=min(vqa_samples, len(vqa_pool)), replace=False))
    rows_out = []
    start = time.perf_counter()
    for i, (layer, f) in enumerate(ctx.keys()):
        label = feature_label(layer, f)
        rels, subset = setup.subset(label)
        if not len(subset):
            log(f"warning: {label} fires on no VSR row; skipped")
            continue
        pool = control_pool(inputs.features_path, layer, [f])
        control = int(np.random.default_rng([seed, layer, f]).choice(pool))
        scale = residual_norm(ctx, setup.vsr, subset, layer, settings.positions,
                              settings.batch_size)
        sets = {
            "VSR relation subset": ("vsr", subset, ctx.directions[(layer, f)]),
            "VQA yes/no": ("vqa", vqa_rows, ctx.directions[(layer, f)]),
            "VSR relation subset, random feature": (
                "vsr", subset, ctx.saes[layer].feature_directions()[control].float()),
        }
        for name, (on, rows, direction) in sets.items():
            ev = setup.evaluator(on)
            base, _ = ev(rows)
            for alpha in alphas:
                right, _ = ev(rows, layer, steering(direction, float(alpha) * scale))
                rows_out.append({
                    "feature": label, "layer": layer, "feature_index": f, "eval_set": name,
                    "alpha": float(alpha), "residual_norm": scale, "n": len(rows),
                    "flip_rate": float(np.mean(right != base)),
                    "accuracy": float(right.mean()), "accuracy_unsteered": float(base.mean()),
                    "vsr_relations": ", ".join(rels),
                    "control_feature": control if "random" in name else -1,
                })
        log(progress_line("steering, features", i + 1, len(ctx.features), start))
    cols = ["feature", "layer", "feature_index", "eval_set", "alpha", "residual_norm", "n",
            "flip_rate", "accuracy", "accuracy_unsteered", "vsr_relations", "control_feature"]
    table = pd.DataFrame(rows_out, columns=cols)
    write_table(table, out["table"])
    save(fig_steering(table), out["steering"], out["steering_pdf"])
    return table


@torch.no_grad()
def residual_norm(ctx: CausalContext, ds: Dataset, rows: np.ndarray, layer: int,
                  positions: str, batch_size: int) -> float:
    """Mean norm of the block-`layer` output at the edited positions of `rows`."""
    total, count = 0.0, 0
    image_id = ctx.model.config.image_token_id
    seen: dict[str, torch.Tensor] = {}

    def grab(h: torch.Tensor) -> torch.Tensor:
        seen["h"] = h
        return h

    for inputs in row_batches(ds, rows, batch_size, ctx.model, ctx.processor, ctx.device):
        span = edit_positions(inputs["input_ids"], inputs["attention_mask"], image_id, positions)
        with replace_layer_output(ctx.model, layer, grab):
            ctx.model.model(**inputs, use_cache=False)
        norms = seen["h"].float().norm(dim=-1)[span]
        total += float(norms.sum())
        count += int(norms.numel())
    return total / max(count, 1)
