"""Drawing a `Scene` as an RGB image: shapes, colours and letters, supersampled."""

from __future__ import annotations

from functools import lru_cache

from PIL import Image, ImageDraw, ImageFont

from vlmdiff.world.scenes import PALETTE, Obj, Scene

BACKGROUND = (238, 238, 232)
SUPERSAMPLE = 4  # draw at 4x and box-filter down: smooth edges and crisp small letters


@lru_cache(maxsize=64)
def _font(px: int, path: str | None = None) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    if path:
        return ImageFont.truetype(path, size=px)
    return ImageFont.load_default(size=px)


def _luminance(rgb: tuple[int, int, int]) -> float:
    r, g, b = rgb
    return 0.299 * r + 0.587 * g + 0.114 * b


def _shape_points(shape: str, x: float, y: float, h: float) -> list[tuple[float, float]]:
    if shape == "triangle":
        return [(x, y - h), (x + h, y + h), (x - h, y + h)]
    if shape == "diamond":
        return [(x, y - h), (x + h, y), (x, y + h), (x - h, y)]
    return [(x - h, y - h), (x + h, y - h), (x + h, y + h), (x - h, y + h)]


def text_anchor(obj: Obj) -> tuple[float, float, float]:
    """Where a letter is drawn: (x, y, font px); on triangles at the centroid, smaller."""
    if obj.shape == "triangle":
        return obj.x, obj.y + obj.size / 5, 0.56 * obj.size
    if obj.shape == "diamond":
        return obj.x, obj.y, 0.5 * obj.size
    return obj.x, obj.y, 0.7 * obj.size


def draw(scene: Scene, font: str | None = None) -> Image.Image:
    """Render a scene as an RGB image: filled shapes, letters in black or white for contrast."""
    s = SUPERSAMPLE
    img = Image.new("RGB", (scene.image_size * s, scene.image_size * s), BACKGROUND)
    pen = ImageDraw.Draw(img)
    for o in scene.objects:
        fill = PALETTE[o.colour]
        x, y, h = o.x * s, o.y * s, o.size * s / 2
        if o.shape == "circle":
            pen.ellipse([x - h, y - h, x + h, y + h], fill=fill)
        else:
            pen.polygon(_shape_points(o.shape, x, y, h), fill=fill)
        if o.text:
            tx, ty, px = text_anchor(o)
            ink = (0, 0, 0) if _luminance(fill) > 150 else (255, 255, 255)
            face = _font(max(4, round(px * s)), font)
            pen.text(
                (tx * s, ty * s),
                o.text,
                fill=ink,
                font=face,
                anchor="mm",
                stroke_width=1,
                stroke_fill=ink,
            )
    return img.reduce(s)
