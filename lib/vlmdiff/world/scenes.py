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
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import numpy as np

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
DEFAULT_FAMILY_WEIGHTS: dict[str, float] = {
    "spatial": 0.4,
    "colour": 0.12,
    "shape": 0.12,
    "count": 0.1,
    "existence": 0.1,
    "ocr": 0.16,
    "position": 0.0,
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
    """Sampling, drawing and relation parameters of the shapes world (lengths in pixels).

    size_range: full side of an object's bounding box; text_prob: chance an object carries one
    of `letters`; tol: position ties (see `relation_holds`); near_gap: largest box gap for
    "next to"; far_dist: smallest centre distance for "far from"; text_grid: cells per axis in
    `describe`; min_gap: smallest box separation between sampled objects (negative allows that
    much overlap); font: a TrueType file for letters (PIL's built-in font when None);
    family_weights: relative frequency of question families (keys of a partial
    mapping override `DEFAULT_FAMILY_WEIGHTS`).
    """

    image_size: int = 48
    min_objects: int = 1
    max_objects: int = 4
    shapes: tuple[str, ...] = ("circle", "square", "triangle")
    colours: tuple[str, ...] = ("red", "green", "blue", "yellow", "purple")
    size_range: tuple[float, float] = (12.0, 18.0)
    text_prob: float = 0.35
    letters: str = "ABCDEFHKLMNPRSTXZ"
    tol: float = 3.0
    near_gap: float = 6.0
    far_dist: float = 28.0
    text_grid: int = 8
    family_weights: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_FAMILY_WEIGHTS))
    min_gap: float = 1.0
    font: str | None = None

    @classmethod
    def from_mapping(cls, d: Mapping[str, Any] | None = None) -> WorldConfig:
        """Build from a plain mapping (e.g. the `world:` block of the workflow config)."""
        d = dict(d or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"world config: unknown key(s) {unknown}; known: {sorted(known)}")
        if "family_weights" in d:
            fw = d["family_weights"]
            if not isinstance(fw, Mapping):
                raise _fail("family_weights", "must be a mapping family -> weight", fw)
            d["family_weights"] = {**DEFAULT_FAMILY_WEIGHTS, **fw}
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["shapes"], d["colours"] = list(self.shapes), list(self.colours)
        d["size_range"] = list(self.size_range)
        return d

    def __post_init__(self) -> None:
        _coerce(self)
        _validate(self)


def _fail(key: str, msg: str, value: Any) -> ValueError:
    return ValueError(f"world config key {key!r}: {msg} (got {value!r})")


def _coerce(cfg: WorldConfig) -> None:
    """Normalise container and number types in place (the dataclass is frozen)."""
    for key in ("image_size", "min_objects", "max_objects", "text_grid"):
        v = getattr(cfg, key)
        is_int = isinstance(v, (int, np.integer)) and not isinstance(v, bool)
        if not (is_int or (isinstance(v, float) and v.is_integer())):
            raise _fail(key, "must be an integer", v)
        object.__setattr__(cfg, key, int(v))
    for key in ("text_prob", "tol", "near_gap", "far_dist", "min_gap"):
        v = getattr(cfg, key)
        if isinstance(v, bool) or not isinstance(v, (int, float, np.number)):
            raise _fail(key, "must be a number", v)
        object.__setattr__(cfg, key, float(v))
    for key in ("shapes", "colours"):
        v = getattr(cfg, key)
        if isinstance(v, str) or not isinstance(v, Sequence):
            raise _fail(key, "must be a list of names", v)
        object.__setattr__(cfg, key, tuple(str(s) for s in v))
    sr = cfg.size_range
    if isinstance(sr, str) or not isinstance(sr, Sequence) or len(sr) != 2:
        raise _fail("size_range", "must be [min, max]", sr)
    object.__setattr__(cfg, "size_range", (float(sr[0]), float(sr[1])))
    if not isinstance(cfg.letters, str):
        raise _fail("letters", "must be a string of capital letters", cfg.letters)
    if not isinstance(cfg.family_weights, Mapping):
        raise _fail("family_weights", "must be a mapping family -> weight", cfg.family_weights)
    object.__setattr__(cfg, "family_weights", {str(k): v for k, v in cfg.family_weights.items()})


def _validate(cfg: WorldConfig) -> None:
    if cfg.image_size < 8:
        raise _fail("image_size", "must be >= 8", cfg.image_size)
    for key, names, known in (("shapes", cfg.shapes, SHAPES), ("colours", cfg.colours, PALETTE)):
        if not names:
            raise _fail(key, "must not be empty", names)
        if len(set(names)) != len(names):
            raise _fail(key, "must not repeat a name", names)
        bad = [n for n in names if n not in known]
        if bad:
            raise _fail(key, f"unknown {bad}; supported: {list(known)}", names)
    if cfg.min_objects < 1:
        raise _fail("min_objects", "must be >= 1", cfg.min_objects)
    if cfg.max_objects < cfg.min_objects:
        raise _fail("max_objects", f"must be >= min_objects ({cfg.min_objects})", cfg.max_objects)
    n_pairs = len(cfg.shapes) * len(cfg.colours)
    if cfg.max_objects > n_pairs:
        raise _fail("max_objects", f"must be <= #colours x #shapes ({n_pairs})", cfg.max_objects)
    lo, hi = cfg.size_range
    if not 0 < lo <= hi <= cfg.image_size:
        raise _fail("size_range", f"need 0 < min <= max <= image_size ({cfg.image_size})", [lo, hi])
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
    if not 0.0 <= cfg.text_prob <= 1.0:
        raise _fail("text_prob", "must lie in [0, 1]", cfg.text_prob)
    letters = cfg.letters
    if (
        not letters
        or not all("A" <= ch <= "Z" for ch in letters)
        or len(set(letters)) != len(letters)
    ):
        raise _fail("letters", "must be distinct capitals A-Z, at least one", letters)
    for key in ("tol", "near_gap"):
        if getattr(cfg, key) < 0:
            raise _fail(key, "must be >= 0", getattr(cfg, key))
    if cfg.far_dist <= 0:
        raise _fail("far_dist", "must be > 0", cfg.far_dist)
    if cfg.text_grid < 1:
        raise _fail("text_grid", "must be >= 1", cfg.text_grid)
    fw = cfg.family_weights
    bad = [k for k in fw if k not in FAMILIES]
    if bad:
        raise _fail("family_weights", f"unknown families {bad}; known: {list(FAMILIES)}", fw)
    for k, v in fw.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0:
            raise _fail(f"family_weights.{k}", "must be a number >= 0", v)
    if sum(fw.values()) <= 0:
        raise _fail("family_weights", "need at least one positive weight", fw)


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
