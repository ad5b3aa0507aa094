"""Pictures and words for them: the shapes world's scenes in words, heat maps over pictures and
where their attention falls (the evidence of `vlmdiff.interp.evidence`)."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from vlmdiff.files import atomic_path

IMAGE_PX = 144  # pictures are drawn larger than the model's input so that people can see them
_COLUMN_WORDS = ("left", "centre", "right")
_ROW_WORDS = ("top", "middle", "bottom")


# ------------------------------------------------------------------------- words for pictures


def _position(x: float, y: float, size: int) -> str:
    col = _COLUMN_WORDS[min(2, max(0, int(3 * x / size)))]
    row = _ROW_WORDS[min(2, max(0, int(3 * y / size)))]
    return "centre" if (row, col) == ("middle", "centre") else f"{row} {col}"


def scene_objects(scene_json: str) -> tuple[int, list[dict[str, Any]]]:
    """(image size, objects) of a shapes-world scene; (0, []) where the row has none."""
    if not scene_json:
        return 0, []
    scene = json.loads(scene_json)
    return int(scene["image_size"]), list(scene["objects"])


def _object_name(o: Mapping[str, Any], size: int) -> str:
    text = f" with the letter {o['text']}" if o.get("text") else ""
    return f"the {o['colour']} {o['shape']}{text} ({_position(o['x'], o['y'], size)})"


def scene_text(scene_json: str) -> str:
    """The picture in words: each object, its letter and where it lies (3 x 3 regions)."""
    size, objects = scene_objects(scene_json)
    return "; ".join(_object_name(o, size) for o in objects)


def attention_shares(grid: np.ndarray, scene_json: str) -> list[tuple[str, float]]:
    """Share of the attention on each object's box (patch centres inside it) and on the
    background, largest first."""
    size, objects = scene_objects(scene_json)
    total = float(grid.sum()) or 1.0
    if not objects:
        return []
    g = grid.shape[0]
    centres = (np.arange(g) + 0.5) * size / g
    ys, xs = np.meshgrid(centres, centres, indexing="ij")
    taken = np.zeros(grid.shape, bool)
    shares = []
    for o in objects:
        half = o["size"] / 2
        inside = (abs(xs - o["x"]) <= half) & (abs(ys - o["y"]) <= half) & ~taken
        taken |= inside
        shares.append((_object_name(o, size), float(grid[inside].sum()) / total))
    shares.append(("the background", float(grid[~taken].sum()) / total))
    return sorted(shares, key=lambda s: -s[1])


def attention_text(grid: np.ndarray, scene_json: str, heads: Sequence[str]) -> str:
    """The heat map in words: where the top heads' attention goes."""
    shares = attention_shares(grid, scene_json)
    where = ", ".join(f"{name} {share:.0%}" for name, share in shares[:3])
    if not where:
        peak = np.unravel_index(int(np.argmax(grid)), grid.shape)
        g = grid.shape[0]
        where = f"peak at the {_position(peak[1] + 0.5, peak[0] + 0.5, g)} of the picture"
    return f"attention of heads {', '.join(heads)}: {where}"


# ------------------------------------------------------------------------- pictures


def picture(image: Image.Image, px: int = IMAGE_PX) -> Image.Image:
    """The sample's picture, enlarged without smoothing."""
    return image.convert("RGB").resize((px, px), Image.NEAREST)


def heat_overlay(image: Image.Image, grid: np.ndarray, px: int = IMAGE_PX) -> Image.Image:
    """The attention grid upsampled over the picture (jet colours, 45 % opacity), scaled as
    the paper's overlays (`causal_plots.draw_overlay`): 4x the uniform share is full colour."""
    from matplotlib import colormaps

    base = picture(image, px)
    heat = np.asarray(Image.fromarray(grid.astype(np.float32), mode="F").resize(
        (px, px), Image.BILINEAR))
    top = max(float(heat.max()), 4.0 / grid.size)
    rgb = (colormaps["jet"](np.clip(heat / top, 0, 1))[..., :3] * 255).astype(np.uint8)
    return Image.blend(base, Image.fromarray(rgb), 0.45)


def save_png(img: Image.Image, path: Path) -> None:
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG")
