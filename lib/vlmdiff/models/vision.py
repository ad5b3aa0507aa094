"""Pretraining the toy CLIP vision tower on the drawn scenes, before the LLaVA stages.

LLaVA starts from a CLIP tower that web-scale pretraining already taught to see. Our tower
starts from scratch, and the language-model answers of the VLM stages are too sparse a signal
to teach it shapes in a CPU budget. So the tower is first trained densely on what we drew:
for every patch, which object (colour and shape) has its centre there, the letter on it, and
where in the patch the centre lies. Only the tower is kept; the per-patch heads are dropped.

None of those targets needs a patch to know where it is in the image, and a tower trained on
them alone forgets: its patch position embeddings fade layer by layer and the projector drops
the rest, so the language model gets image tokens that do not say which column they are in
(`evaluation.image_token_positions`). `position_weight` > 0 adds a fourth head that reads each
patch's own grid position (column, row), which keeps it linearly in the tower's features
(`position_r2` measures it); LLaVA stage 2 still wipes it from the projector's output.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from datasets import Dataset
from transformers import CLIPVisionModel

from vlmdiff import config
from vlmdiff.inputs import image_groups
from vlmdiff.logs import Log
from vlmdiff.models.training import OptimConfig, train


def patch_labels(
    scenes: Sequence[str], world: Mapping[str, Any], image_size: int, patch_size: int
) -> dict[str, torch.Tensor]:
    """Per-patch targets, row-major over the `image_size // patch_size` grid (`world`: the
    `world.scene` config section).

    `object`: index of the (colour, shape) pair whose centre lies in the patch, or
    `n_pairs` for none; `letter`: 1 + index of its letter in `world.letters`, 0 for none or
    no object; `offset`: the centre's position inside the patch in [0, 1] (x, y), 0 where
    no centre lies.
    """
    colours, shapes = list(world["colours"]), list(world["shapes"])
    letters = config.section("world.scene", world)["letters"]
    grid = image_size // patch_size
    n_pairs = len(colours) * len(shapes)
    obj = torch.full((len(scenes), grid * grid), n_pairs, dtype=torch.long)
    letter = torch.zeros((len(scenes), grid * grid), dtype=torch.long)
    offset = torch.zeros((len(scenes), grid * grid, 2))
    for i, scene in enumerate(scenes):
        for o in json.loads(scene)["objects"]:
            col = min(grid - 1, int(o["x"] // patch_size))
            row = min(grid - 1, int(o["y"] // patch_size))
            cell = row * grid + col
            obj[i, cell] = colours.index(o["colour"]) * len(shapes) + shapes.index(o["shape"])
            letter[i, cell] = 1 + letters.index(o["text"]) if o.get("text") else 0
            offset[i, cell, 0] = o["x"] / patch_size - col
            offset[i, cell, 1] = o["y"] / patch_size - row
    return {"object": obj, "letter": letter, "offset": offset}


def grid_positions(grid: int) -> torch.Tensor:
    """(grid * grid, 2) row-major (column, row) of each patch, scaled to [0, 1]."""
    cells = torch.arange(grid * grid)
    pos = torch.stack([cells % grid, cells // grid], dim=1).float()
    return pos / max(1, grid - 1)


class PatchProbe(torch.nn.Module):
    """The tower plus per-patch heads; `forward` returns the summed loss as `.loss`."""

    def __init__(
        self, tower: CLIPVisionModel, n_objects: int, n_letters: int, position_weight: float = 0.0
    ) -> None:
        super().__init__()
        d = tower.config.hidden_size
        self.tower = tower
        self.object_head = torch.nn.Linear(d, n_objects + 1)
        self.letter_head = torch.nn.Linear(d, n_letters + 1)
        self.offset_head = torch.nn.Linear(d, 2)
        self.position_weight = position_weight
        if position_weight > 0:
            self.position_head = torch.nn.Linear(d, 2)
            grid = tower.config.image_size // tower.config.patch_size
            self.register_buffer("positions", grid_positions(grid), persistent=False)

    def predict(self, pixel_values: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.tower(pixel_values=pixel_values).last_hidden_state[:, 1:]  # CLS dropped
        out = {"features": h, "object": self.object_head(h), "letter": self.letter_head(h),
               "offset": self.offset_head(h)}
        if self.position_weight > 0:
            out["position"] = self.position_head(h)
        return out

    def forward(self, pixel_values, object, letter, offset):  # noqa: A002 - target name
        out = self.predict(pixel_values)
        ce = torch.nn.functional.cross_entropy
        mse = torch.nn.functional.mse_loss
        loss = ce(out["object"].flatten(0, 1), object.flatten())
        has = object.flatten() < out["object"].shape[-1] - 1
        if has.any():
            loss = loss + ce(out["letter"].flatten(0, 1)[has], letter.flatten()[has])
            loss = loss + mse(torch.sigmoid(out["offset"].flatten(0, 1)[has]), offset.flatten(0, 1)[has])
        if self.position_weight > 0:
            target = self.positions.expand_as(out["position"])
            loss = loss + self.position_weight * mse(out["position"], target)
        return SimpleNamespace(loss=loss)


def _batches(pixels: torch.Tensor, labels: Mapping[str, torch.Tensor], batch_size: int, seed: int):
    rng = np.random.default_rng(seed)
    while True:
        order = torch.as_tensor(rng.permutation(len(pixels)))
        for start in range(0, len(order) - batch_size + 1, batch_size):
            idx = order[start : start + batch_size]
            yield {"pixel_values": pixels[idx].float(), **{k: v[idx] for k, v in labels.items()}}


def unique_images(ds: Dataset) -> Dataset:
    """One row per image (rows sharing an `image_id` show the same picture)."""
    if "image_id" not in ds.column_names:
        return ds
    return ds.select([a for a, _ in image_groups(ds["image_id"])])


def pretrain_vision(
    tower: CLIPVisionModel,
    ds: Dataset,
    image_processor,
    world: Mapping[str, Any],
    optim_cfg: Mapping[str, Any],
    seed: int,
    device: torch.device,
    log: Log = print,
) -> tuple[list[dict[str, float]], dict[str, float]]:
    """Train `tower` in place on per-patch targets of `ds`'s images; returns the loss history
    and held-out per-patch accuracies (the last 10% of images, at most 1000)."""
    ds = unique_images(ds)
    world = config.section("world.scene", world)
    optim_cfg = config.section("vision.pretrain", optim_cfg)
    size, patch = tower.config.image_size, tower.config.patch_size
    pixels = torch.as_tensor(
        np.stack(image_processor(list(ds["image"]))["pixel_values"]), dtype=torch.float16
    )
    labels = patch_labels(ds["scene"], world, size, patch)
    n_held = min(1000, len(ds) // 10)
    n_train = len(ds) - n_held
    probe = PatchProbe(
        tower,
        len(world["colours"]) * len(world["shapes"]),
        len(world["letters"]),
        optim_cfg["position_weight"],
    ).to(device)
    log(f"vision pretraining: {n_train} images, {n_held} held out, {labels['object'].shape[1]} patches each")
    cfg = OptimConfig.from_mapping(optim_cfg, "vision.pretrain")
    train_labels = {k: v[:n_train] for k, v in labels.items()}
    it = _batches(pixels[:n_train], train_labels, cfg.batch_size, seed)
    history = train(probe, list(probe.parameters()), it, cfg, device, "vision", log)
    metrics = patch_accuracy(probe, pixels[n_train:], {k: v[n_train:] for k, v in labels.items()}, device)
    log("vision held-out: " + ", ".join(f"{k} {v:.3f}" for k, v in metrics.items()))
    return history, metrics



def pretrain_vision_job(
    *,
    train_path: str | Path,
    vision: Mapping[str, Any],
    scene: Mapping[str, Any],
    image_size: int,
    seed: int,
    device: str,
    out: Mapping[str, str | Path],
    log: Log = print,
) -> tuple[list[dict[str, float]], dict[str, float]]:
    """The `pretrain_vision` rule: a fresh tower of the `vision` config, `pretrain_vision` on
    the train split's images (`vision["pretrain"]`); the tower to `out["model"]`, the loss
    history to `out["history"]`, the held-out accuracies to `out["metrics"]` (JSON)."""
    import pandas as pd

    from vlmdiff.models.build import (
        build_vision_tower,
        make_image_processor,
        resolve_device,
        save_atomic,
    )
    from vlmdiff.world.datasets import write_json
    from vlmdiff.world.layouts import load_split

    tower = build_vision_tower(vision, image_size, seed)
    history, metrics = pretrain_vision(
        tower, load_split(train_path), make_image_processor(image_size), scene,
        vision["pretrain"], seed, resolve_device(device), log,
    )
    save_atomic([tower.cpu()], out["model"])
    pd.DataFrame(history).to_csv(out["history"], index=False)
    write_json(metrics, out["metrics"])
    return history, metrics

@torch.no_grad()
def patch_accuracy(
    probe: PatchProbe, pixels: torch.Tensor, labels: Mapping[str, torch.Tensor], device: torch.device
) -> dict[str, float]:
    """Object accuracy on patches holding a centre, on empty patches, letter accuracy, and
    `position_r2`: how linearly the tower's patch features say where each patch is (the mean of
    `patch_place_r2`'s column and row; NaN below 4 images)."""
    if len(pixels) == 0:
        return {"position_r2": float("nan")}
    probe.eval()
    preds = {k: [] for k in ("object", "letter", "features")}
    for start in range(0, len(pixels), 256):
        out = probe.predict(pixels[start : start + 256].float().to(device))
        preds["features"].append(out["features"].float().cpu())
        for k in ("object", "letter"):
            preds[k].append(out[k].argmax(-1).cpu())
    obj, letter = torch.cat(preds["object"]), torch.cat(preds["letter"])
    has = labels["object"] < probe.object_head.out_features - 1
    r2 = np.mean(patch_place_r2(torch.cat(preds["features"]))) if len(pixels) >= 4 else np.nan
    return {
        "object_accuracy": float((obj[has] == labels["object"][has]).float().mean()),
        "empty_accuracy": float((obj[~has] == labels["object"][~has]).float().mean()),
        "letter_accuracy": float((letter[has] == labels["letter"][has]).float().mean()),
        "position_r2": float(r2),
    }


def linear_r2(x: torch.Tensor, y: torch.Tensor, ridge: float = 1e-3, train_fraction: float = 0.7) -> float:
    """Held-out R^2 of a ridge regression from rows of `x` to the targets `y` (n, k), averaged
    over the k targets; rows are split in order, so callers pass them shuffled or by image."""
    x, y = x.double(), y.double()
    n = int(len(x) * train_fraction)
    if n < 2 or len(x) - n < 2:
        return float("nan")
    xm, ym = x[:n].mean(0), y[:n].mean(0)
    xc = x[:n] - xm
    gram = xc.T @ xc
    # The ridge is relative to the features' mean variance, so the R^2 does not depend on their scale.
    eye = torch.eye(x.shape[1], dtype=x.dtype) * gram.diagonal().mean()
    w = torch.linalg.solve(gram + ridge * eye, xc.T @ (y[:n] - ym))
    pred = (x[n:] - xm) @ w + ym
    resid = ((pred - y[n:]) ** 2).mean(0)
    return float((1 - resid / y[n:].var(0, unbiased=False)).mean())


def patch_place_r2(features: torch.Tensor) -> tuple[float, float]:
    """Held-out R^2 of ridge probes for each patch's column and row from per-patch features
    `[images, patches (row-major square grid), dim]`, fitted on 70% of the images."""
    grid = grid_positions(int(round(features.shape[1] ** 0.5)))
    x, y = features.flatten(0, 1), grid.repeat(len(features), 1)
    return linear_r2(x, y[:, :1]), linear_r2(x, y[:, 1:])
