"""The shapes world: procedurally drawn scenes with known geometry, and questions about them.

Because every image is drawn from a `Scene`, each answer below is computed from object
coordinates and attributes, never from what a template was meant to ask; later stages can
therefore check a model's behaviour against ground truth.

Geometry conventions: pixel coordinates, x to the right, y DOWN (as in images); an object's
`x, y` is the centre of its square bounding box of side `size`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence, Set
from dataclasses import asdict, dataclass, field, fields
from functools import lru_cache
from itertools import permutations
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

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
BACKGROUND = (238, 238, 232)
SUPERSAMPLE = 4  # draw at 4x and box-filter down: smooth edges and crisp small letters
_SPATIAL_QUERY_FRACTION = 0.25  # share of spatial questions asking "what shape is left of ..."
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


# ---------------------------------------------------------------------------------------------
# Relations


def box_separation(a: Obj, b: Obj) -> float:
    """Signed separation of two bounding boxes: the larger of the horizontal and vertical gaps.

    >= 0 means the boxes are apart (0: touching); < 0 means they overlap by that much.
    """
    half = (a.size + b.size) / 2
    return max(abs(a.x - b.x) - half, abs(a.y - b.y) - half)


def box_gap(a: Obj, b: Obj) -> float:
    """Shortest Euclidean distance between two bounding boxes (0 when touching or overlapping)."""
    half = (a.size + b.size) / 2
    gx = max(0.0, abs(a.x - b.x) - half)
    gy = max(0.0, abs(a.y - b.y) - half)
    return math.hypot(gx, gy)


def centre_distance(a: Obj, b: Obj) -> float:
    return math.hypot(a.x - b.x, a.y - b.y)


def is_between(a: Obj, b: Obj, c: Obj, tol: float) -> bool:
    """`a` between `b` and `c`: on the axis where b and c are further apart (x on equal spans),
    a's centre lies strictly inside (min + tol, max - tol) of b's and c's centres."""
    if a in (b, c) or b == c:
        return False
    if abs(b.x - c.x) >= abs(b.y - c.y):
        va, vb, vc = a.x, b.x, c.x
    else:
        va, vb, vc = a.y, b.y, c.y
    return min(vb, vc) + tol < va < max(vb, vc) - tol


def relation_holds(rel: str, a: Obj, b: Obj, cfg: WorldConfig, c: Obj | None = None) -> bool:
    """Whether "a <rel> b" (or "a between b and c") holds, from centres and bounding boxes only.

    With dx = b.x - a.x and dy = b.y - a.y (image y axis points down):
      left of:  dx > tol         right of: -dx > tol
      above:    dy > tol         below:    -dy > tol
      (|dx| <= tol is a tie: neither left of nor right of; likewise above/below.)
      next to:  box_gap(a, b) <= near_gap  (Euclidean gap between bounding boxes; touching or
                overlapping boxes have gap 0)
      far from: centre distance >= far_dist
      between:  see `is_between` (needs c).
    An object is never in a relation with itself.
    """
    if rel == "between":
        if c is None:
            raise ValueError("relation 'between' needs a third object c")
        return is_between(a, b, c, cfg.tol)
    if rel not in BINARY_RELATIONS:
        raise ValueError(f"unknown relation {rel!r}; known: {list(RELATIONS)}")
    if c is not None:
        raise ValueError(f"relation {rel!r} takes two objects, got a third")
    if a == b:
        return False
    if rel == "left of":
        return b.x - a.x > cfg.tol
    if rel == "right of":
        return a.x - b.x > cfg.tol
    if rel == "above":
        return b.y - a.y > cfg.tol
    if rel == "below":
        return a.y - b.y > cfg.tol
    if rel == "next to":
        return box_gap(a, b) <= cfg.near_gap
    return centre_distance(a, b) >= cfg.far_dist  # "far from"


# ---------------------------------------------------------------------------------------------
# Questions


@dataclass(frozen=True)
class QA:
    """One question with its ground-truth answer.

    `subj`, `obj`, `obj2` name the objects the question is about ("red circle"; for colour/shape
    questions the partial name used, e.g. "circle" or "red object"), None where not applicable.
    For spatial questions the relation reads "subj <relation> obj [and obj2]".
    """

    question: str
    answer: str
    family: str
    relation: str | None
    answer_type: str
    question_type: str
    subj: str | None = None
    obj: str | None = None
    obj2: str | None = None


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _pick(rng: np.random.Generator, items: Sequence[Any]) -> Any:
    return items[int(rng.integers(len(items)))]


def _yes_no(rng: np.random.Generator) -> bool:
    return bool(rng.random() < 0.5)


def _word(flag: bool) -> str:
    return "yes" if flag else "no"


def _fresh(qas: Sequence[QA], seen: Set[str]) -> list[QA]:
    return [qa for qa in qas if qa.question not in seen]


def _pick_balanced(rng: np.random.Generator, qas: Sequence[QA]) -> QA | None:
    """A yes/no question with a 50/50 answer; None unless both answers are available.

    Asking only where both answers occur keeps every family, relation and wording balanced,
    instead of balanced only on average over scenes.
    """
    yes = [qa for qa in qas if qa.answer == "yes"]
    no = [qa for qa in qas if qa.answer == "no"]
    if not yes or not no:
        return None
    return _pick(rng, yes if _yes_no(rng) else no)


def relation_cases(scene: Scene, rel: str) -> list[tuple[Obj, Obj, Obj | None]]:
    """Every ordered (a, b, c) a question about `rel` can name; c is None unless "between"."""
    objs = scene.objects
    if rel == "between":
        return [(a, b, c) for a in objs for b, c in permutations([o for o in objs if o != a], 2)]
    return [(a, b, None) for a, b in permutations(objs, 2)]


def _spatial_yes_no(
    scene: Scene, rng: np.random.Generator, cfg: WorldConfig, seen: Set[str]
) -> QA | None:
    """ "is the red circle left of the blue square?" for a relation with both answers here."""
    rels = RELATIONS if len(scene.objects) >= 3 else BINARY_RELATIONS
    for k in rng.permutation(len(rels)):
        rel = rels[int(k)]
        qas = []
        for a, b, c in relation_cases(scene, rel):
            answer = _word(relation_holds(rel, a, b, cfg, c))
            if c is not None:
                q = f"is the {a.name} between the {b.name} and the {c.name}?"
                qas.append(
                    QA(q, answer, "spatial", rel, "yes/no", "is the", a.name, b.name, c.name)
                )
                continue
            for phrase in RELATION_PHRASES[rel]:
                q = f"is the {a.name} {phrase} the {b.name}?"
                qas.append(QA(q, answer, "spatial", rel, "yes/no", "is the", a.name, b.name))
        qa = _pick_balanced(rng, _fresh(qas, seen))
        if qa is not None:
            return qa
    return None


def _spatial_query(
    scene: Scene, rng: np.random.Generator, cfg: WorldConfig, seen: Set[str]
) -> QA | None:
    """ "what shape is left of the red circle?": asked only when exactly one object satisfies."""
    objs = scene.objects
    rels = RELATIONS if len(objs) >= 3 else BINARY_RELATIONS
    for k in rng.permutation(len(rels)):
        rel = rels[int(k)]
        qas = []
        refs = permutations(objs, 2) if rel == "between" else ((ref, None) for ref in objs)
        for b, c in refs:
            hits = [o for o in objs if relation_holds(rel, o, b, cfg, c)]
            if len(hits) != 1:
                continue
            t = hits[0]
            if c is not None:
                wheres = [f"between the {b.name} and the {c.name}"]
            else:
                wheres = [f"{phrase} the {b.name}" for phrase in RELATION_PHRASES[rel]]
            o2 = c.name if c is not None else None
            for where in wheres:
                qas += [
                    QA(
                        f"what shape is {where}?",
                        t.shape,
                        "spatial",
                        rel,
                        "other",
                        "what",
                        t.name,
                        b.name,
                        o2,
                    ),
                    QA(
                        f"what color is the object {where}?",
                        t.colour,
                        "spatial",
                        rel,
                        "other",
                        "what color is the",
                        t.name,
                        b.name,
                        o2,
                    ),
                    QA(
                        f"what colour is the object {where}?",
                        t.colour,
                        "spatial",
                        rel,
                        "other",
                        "what",
                        t.name,
                        b.name,
                        o2,
                    ),
                ]
        qas = _fresh(qas, seen)
        if qas:
            return _pick(rng, qas)
    return None


def _spatial(scene: Scene, rng: np.random.Generator, cfg: WorldConfig, seen: Set[str]) -> QA | None:
    if len(scene.objects) < 2:
        return None
    if rng.random() < _SPATIAL_QUERY_FRACTION:
        return _spatial_query(scene, rng, cfg, seen)
    return _spatial_yes_no(scene, rng, cfg, seen)


def _colour(scene: Scene, rng: np.random.Generator, cfg: WorldConfig, seen: Set[str]) -> QA | None:
    """ "what colour is the circle?", only for a shape that occurs once in the scene."""
    shapes = [o.shape for o in scene.objects]
    qas = []
    for o in scene.objects:
        if shapes.count(o.shape) == 1:
            qas += [
                QA(
                    f"what color is the {o.shape}?",
                    o.colour,
                    "colour",
                    None,
                    "other",
                    "what color is the",
                    o.shape,
                ),
                QA(
                    f"what colour is the {o.shape}?",
                    o.colour,
                    "colour",
                    None,
                    "other",
                    "what",
                    o.shape,
                ),
            ]
    qas = _fresh(qas, seen)
    return _pick(rng, qas) if qas else None


def _shape(scene: Scene, rng: np.random.Generator, cfg: WorldConfig, seen: Set[str]) -> QA | None:
    """ "what shape is the red object?", only for a colour that occurs once in the scene."""
    colours = [o.colour for o in scene.objects]
    qas = []
    for o in scene.objects:
        if colours.count(o.colour) == 1:
            ref = f"{o.colour} object"
            qas += [
                QA(f"what shape is the {ref}?", o.shape, "shape", None, "other", "what", ref),
                QA(
                    f"what is the shape of the {ref}?",
                    o.shape,
                    "shape",
                    None,
                    "other",
                    "what is the",
                    ref,
                ),
            ]
    qas = _fresh(qas, seen)
    return _pick(rng, qas) if qas else None


def _count(scene: Scene, rng: np.random.Generator, cfg: WorldConfig, seen: Set[str]) -> QA | None:
    """ "how many circles are there?"; the kind (all, by shape, by colour) is drawn first."""
    objs = scene.objects
    kinds = [
        [("objects", len(objs), "how many objects are there?")],
        [(s, sum(o.shape == s for o in objs), f"how many {s}s are there?") for s in cfg.shapes],
        [
            (f"{c} object", sum(o.colour == c for o in objs), f"how many {c} objects are there?")
            for c in cfg.colours
        ],
    ]
    for k in rng.permutation(len(kinds)):
        qas = [QA(q, str(n), "count", None, "number", "how many", ref) for ref, n, q in kinds[k]]
        qas = _fresh(qas, seen)
        if qas:
            return _pick(rng, qas)
    return None


def _existence(
    scene: Scene, rng: np.random.Generator, cfg: WorldConfig, seen: Set[str]
) -> QA | None:
    """ "is there a blue triangle?" / "is there a circle?" / "is there a red object?"."""
    objs = scene.objects
    forms: list[tuple[list[str], set[str]]] = [
        ([f"{c} {s}" for c in cfg.colours for s in cfg.shapes], {o.name for o in objs}),
        (list(cfg.shapes), {o.shape for o in objs}),
        ([f"{c} object" for c in cfg.colours], {f"{o.colour} object" for o in objs}),
    ]
    for k in rng.permutation(len(forms)):
        names, present = forms[int(k)]
        qas = []
        for name in names:
            art = _article(name)
            qtype = "is there a" if art == "a" else "is there"
            qas.append(
                QA(
                    f"is there {art} {name}?",
                    _word(name in present),
                    "existence",
                    None,
                    "yes/no",
                    qtype,
                    name,
                )
            )
        qa = _pick_balanced(rng, _fresh(qas, seen))
        if qa is not None:
            return qa
    return None


def _ocr(scene: Scene, rng: np.random.Generator, cfg: WorldConfig, seen: Set[str]) -> QA | None:
    """ "what letter is on the square?", naming the object by any unambiguous reference."""
    objs = scene.objects
    qas = []
    for o in objs:
        if not o.text:
            continue
        refs = [o.name]
        if sum(p.shape == o.shape for p in objs) == 1:
            refs.append(o.shape)
        if sum(p.colour == o.colour for p in objs) == 1:
            refs.append(f"{o.colour} object")
        for ref in refs:
            for verb in ("is on", "is written on"):
                qas.append(
                    QA(
                        f"what letter {verb} the {ref}?",
                        o.text.lower(),
                        "ocr",
                        None,
                        "other",
                        "what",
                        ref,
                    )
                )
    qas = _fresh(qas, seen)
    return _pick(rng, qas) if qas else None


def _position(
    scene: Scene, rng: np.random.Generator, cfg: WorldConfig, seen: Set[str]
) -> QA | None:
    """ "what column is the red circle in?": the `text_grid` cell of the object's centre, the
    number that the text corpus writes after "column" / "row"."""
    qas = []
    for o in scene.objects:
        for axis, v in (("column", o.x), ("row", o.y)):
            cell = str(grid_cell(v, scene.image_size, cfg.text_grid))
            for q, qtype in (
                (f"what {axis} is the {o.name} in?", "what"),
                (f"in what {axis} is the {o.name}?", "in what"),
            ):
                qas.append(QA(q, cell, "position", None, "number", qtype, o.name))
    qas = _fresh(qas, seen)
    return _pick(rng, qas) if qas else None


FamilyMaker = Callable[[Scene, np.random.Generator, WorldConfig, Set[str]], "QA | None"]
FAMILY_MAKERS: dict[str, FamilyMaker] = {
    "spatial": _spatial,
    "colour": _colour,
    "shape": _shape,
    "count": _count,
    "existence": _existence,
    "ocr": _ocr,
    "position": _position,
}


def _weighted_index(rng: np.random.Generator, weights: Sequence[float]) -> int:
    """Index drawn with probability proportional to `weights` (cheaper than rng.choice(p=))."""
    r = rng.random() * sum(weights)
    for i, wt in enumerate(weights):
        r -= wt
        if r < 0 and wt > 0:
            return i
    return max(i for i, wt in enumerate(weights) if wt > 0)


def make_question(
    scene: Scene, rng: np.random.Generator, cfg: WorldConfig, seen: Set[str] = frozenset()
) -> QA:
    """One question not in `seen`: the family is drawn by `family_weights`, and redrawn (without
    the failed family) when it has no question for this scene. Repeats only when nothing is new.
    """
    for avoid in (seen, frozenset()):
        weights = [float(cfg.family_weights.get(f, 0.0)) for f in FAMILIES]
        while sum(weights) > 0:
            k = _weighted_index(rng, weights)
            qa = FAMILY_MAKERS[FAMILIES[k]](scene, rng, cfg, avoid)
            if qa is not None:
                return qa
            weights[k] = 0.0
    qa = _count(scene, rng, cfg, frozenset())
    assert qa is not None  # "how many objects" always exists
    return qa


def make_questions(scene: Scene, rng: np.random.Generator, cfg: WorldConfig, n: int) -> list[QA]:
    """`n` distinct questions about one scene (repeats only if the scene runs out)."""
    out: list[QA] = []
    seen: set[str] = set()
    for _ in range(n):
        qa = make_question(scene, rng, cfg, seen)
        seen.add(qa.question)
        out.append(qa)
    return out


# ---------------------------------------------------------------------------------------------
# Text


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
        words = [_article(o.colour), o.colour, o.shape]
        if o.text:
            words += ["with", "the", "letter", o.text.lower()]
        col = grid_cell(o.x, scene.image_size, cfg.text_grid)
        row = grid_cell(o.y, scene.image_size, cfg.text_grid)
        words += ["at", "column", str(col), "row", str(row), "."]
        parts.append(" ".join(words))
    return " ".join(parts)
