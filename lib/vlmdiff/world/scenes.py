"""The shapes world's scenes: objects, the world config, scene sampling and descriptions.

Because every image is drawn from a `Scene`, each answer below is computed from object
coordinates and attributes, never from what a template was meant to ask; later stages can
therefore check a model's behaviour against ground truth.

Geometry conventions: pixel coordinates, x to the right, y DOWN (as in images); an object's
`x, y` is the centre of its square bounding box of side `size`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from vlmdiff import config

PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (215, 40, 40),
    "green": (35, 150, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 205, 30),
    "purple": (135, 55, 185),
    "orange": (245, 135, 25),
    "pink": (240, 125, 185),
    "brown": (130, 80, 40),
    "cyan": (35, 190, 210),
    "gray": (125, 125, 125),
    "black": (25, 25, 25),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond")
FAMILIES: tuple[str, ...] = ("spatial", "colour", "shape", "count", "existence", "ocr", "position")
RELATIONS: tuple[str, ...] = (
    "left of",
    "right of",
    "above",
    "below",
    "next to",
    "far from",
    "between",
)
BINARY_RELATIONS: tuple[str, ...] = RELATIONS[:-1]
# Wordings per canonical relation; each is followed by "the <object>".
RELATION_PHRASES: dict[str, tuple[str, ...]] = {
    "left of": ("left of", "to the left of", "on the left side of"),
    "right of": ("right of", "to the right of", "on the right side of"),
    "above": ("above", "over"),
    "below": ("below", "under", "beneath"),
    "next to": ("next to", "beside"),
    "far from": ("far from", "far away from"),
    "between": ("between",),
}
_PLACE_TRIES = 512
_PLACE_BATCH = 128
_SCENE_TRIES = 1000


@dataclass(frozen=True)
class Obj:
    """One filled shape; `x, y` is the bounding-box centre (y down), `size` its full side."""

    shape: str
    colour: str
    x: float
    y: float
    size: float
    text: str | None = None

    @property
    def name(self) -> str:
        """The phrase naming this object, e.g. "red circle" (unique within a scene)."""
        return f"{self.colour} {self.shape}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "shape": self.shape,
            "colour": self.colour,
            "x": self.x,
            "y": self.y,
            "size": self.size,
            "text": self.text,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Obj:
        return cls(
            shape=str(d["shape"]),
            colour=str(d["colour"]),
            x=float(d["x"]),
            y=float(d["y"]),
            size=float(d["size"]),
            text=None if d.get("text") is None else str(d["text"]),
        )


@dataclass(frozen=True)
class Scene:
    objects: tuple[Obj, ...]
    image_size: int

    def to_dict(self) -> dict[str, Any]:
        return {"image_size": self.image_size, "objects": [o.to_dict() for o in self.objects]}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Scene:
        objs = tuple(Obj.from_dict(o) for o in d["objects"])
        return cls(objects=objs, image_size=int(d["image_size"]))


@dataclass(frozen=True)
class WorldConfig:
    """Sampling, drawing and relation parameters of the shapes world (lengths in pixels): the
    `world.scene` config section. Its keys, defaults and ranges are the schema's
    (schemas/config.schema.yaml); build one with `from_mapping` or `default`.

    size_range: full side of an object's bounding box; text_prob: chance an object carries one
    of `letters`; tol: position ties (see `relation_holds`); near_gap: largest box gap for
    "next to"; far_dist: smallest centre distance for "far from"; text_grid: cells per axis in
    `describe`; min_gap: smallest box separation between sampled objects (negative allows that
    much overlap); font: a TrueType file for letters (PIL's built-in font when None);
    family_weights: relative frequency of question families; relations: those spatial questions
    ask about.
    """

    image_size: int
    min_objects: int
    max_objects: int
    shapes: tuple[str, ...]
    colours: tuple[str, ...]
    size_range: tuple[float, float]
    text_prob: float
    letters: str
    tol: float
    near_gap: float
    far_dist: float
    text_grid: int
    family_weights: dict[str, float]
    min_gap: float
    font: str | None
    relations: tuple[str, ...] = RELATIONS

    @classmethod
    def from_mapping(cls, d: Mapping[str, Any] | None = None) -> WorldConfig:
        """From a plain mapping (the `world.scene` block of the workflow config), checked
        against the schema with its defaults filled in (a partial `family_weights` too)."""
        return config.build(cls, SECTION, d)

    @classmethod
    def default(cls) -> WorldConfig:
        return cls.from_mapping({})

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["shapes"], d["colours"] = list(self.shapes), list(self.colours)
        d["size_range"], d["relations"] = list(self.size_range), list(self.relations)
        return d

    def __post_init__(self) -> None:
        _check(self)


SECTION = "world.scene"


def _fail(key: str, msg: str, value: Any) -> config.ConfigError:
    return config.ConfigError(f"config key '{SECTION}.{key}': {msg} (got {value!r})")


def _check(cfg: WorldConfig) -> None:
    """What the schema cannot say: rules between keys."""
    if cfg.max_objects < cfg.min_objects:
        raise _fail("max_objects", f"must be >= min_objects ({cfg.min_objects})", cfg.max_objects)
    lo, hi = cfg.size_range
    if not lo <= hi <= cfg.image_size:
        raise _fail("size_range", f"need min <= max <= image_size ({cfg.image_size})", [lo, hi])
    if not -lo < cfg.min_gap < cfg.image_size:
        raise _fail("min_gap", f"must lie in (-{lo}, image_size)", cfg.min_gap)
    # Objects fit if a grid of cells of side (max size + gap) holds max_objects; this also keeps
    # rejection sampling fast.
    per_axis = math.floor((cfg.image_size + cfg.min_gap) / (hi + cfg.min_gap))
    if per_axis**2 < cfg.max_objects:
        raise _fail(
            "max_objects",
            f"{cfg.max_objects} objects of size up to {hi} px with min_gap {cfg.min_gap} px "
            f"do not reliably fit in {cfg.image_size} px; lower size_range or max_objects",
            cfg.max_objects,
        )
    if sum(cfg.family_weights.values()) <= 0:
        raise _fail("family_weights", "need at least one positive weight", cfg.family_weights)


# ---------------------------------------------------------------------------------------------
# Sampling and drawing


def _place(
    rng: np.random.Generator, placed: Sequence[Obj], size: float, w: int, min_gap: float
) -> tuple[float, float] | None:
    """A centre whose box keeps `min_gap` from every placed box (batched rejection sampling)."""
    half = size / 2
    if placed:
        px, py, ps = np.array([(o.x, o.y, o.size) for o in placed]).T
        reach = (ps + size) / 2 + min_gap
    for _ in range(_PLACE_TRIES // _PLACE_BATCH):
        # Rounded so that stored coordinates are exactly the ones checked (and short in JSON).
        xy = np.round(rng.uniform(half, w - half, size=(_PLACE_BATCH, 2)), 2)
        xy = np.clip(xy, half, w - half)
        if not placed:
            return float(xy[0, 0]), float(xy[0, 1])
        sep = np.maximum(np.abs(xy[:, :1] - px), np.abs(xy[:, 1:] - py)) - reach
        ok = (sep >= 0).all(axis=1)
        if ok.any():
            i = int(ok.argmax())
            return float(xy[i, 0]), float(xy[i, 1])
    return None


def sample_scene(rng: np.random.Generator, cfg: WorldConfig) -> Scene:
    """Draw a scene: distinct (colour, shape) pairs, boxes separated by at least `min_gap`
    (see `box_separation`; a negative `min_gap` allows that much overlap)."""
    pairs = [(c, s) for c in cfg.colours for s in cfg.shapes]
    lo, hi = cfg.size_range
    w = cfg.image_size
    # n is fixed before retrying so crowded scenes are not under-represented.
    n = int(rng.integers(cfg.min_objects, cfg.max_objects + 1))
    for _ in range(_SCENE_TRIES):
        picks = rng.permutation(len(pairs))[:n].tolist()
        sizes = [round(v, 2) for v in rng.uniform(lo, hi, size=n).tolist()]
        has_text = (rng.random(n) < cfg.text_prob).tolist()
        letters = rng.integers(len(cfg.letters), size=n).tolist()
        placed: list[Obj] = []
        for k in range(n):
            size = sizes[k]
            xy = _place(rng, placed, size, w, cfg.min_gap)
            if xy is None:
                break
            colour, shape = pairs[picks[k]]
            text = cfg.letters[letters[k]] if has_text[k] else None
            placed.append(Obj(shape, colour, xy[0], xy[1], size, text))
        if len(placed) == n:
            return Scene(tuple(placed), w)
    raise RuntimeError(f"could not place {n} objects; relax world.size_range or min_gap")


# ---------------------------------------------------------------------------------------------
# Text


def article(word: str) -> str:
    """ "a" or "an" before `word`."""
    return "an" if word[0] in "aeiou" else "a"


def grid_cell(v: float, image_size: int, grid: int) -> int:
    """1-based grid cell (column from the left or row from the top) holding coordinate `v`."""
    return min(grid - 1, max(0, int(v * grid / image_size))) + 1


def describe(scene: Scene, cfg: WorldConfig, rng: np.random.Generator | None = None) -> str:
    """The scene in words, e.g. "a red circle with the letter k at column 2 row 5 . ...".

    Positions are the 1-based `text_grid` cells of object centres (columns from the left, rows
    from the top); objects are listed in scene order, or shuffled when `rng` is given.
    """
    order = list(range(len(scene.objects)))
    if rng is not None:
        order = [int(i) for i in rng.permutation(len(order))]
    parts = []
    for i in order:
        o = scene.objects[i]
        words = [article(o.colour), o.colour, o.shape]
        if o.text:
            words += ["with", "the", "letter", o.text.lower()]
        col = grid_cell(o.x, scene.image_size, cfg.text_grid)
        row = grid_cell(o.y, scene.image_size, cfg.text_grid)
        words += ["at", "column", str(col), "row", str(row), "."]
        parts.append(" ".join(words))
    return " ".join(parts)
