"""Questions about a scene in seven families, each answer computed from the scene.

Spatial relations, colour, shape, count, existence, OCR and position ("what column is the red
circle in?", "is the red circle in the left half?"), with varied wording, single-word answers and balanced yes/no.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence, Set
from dataclasses import dataclass
from itertools import permutations
from typing import Any

import numpy as np

from vlmdiff.world.relations import relation_holds
from vlmdiff.world.scenes import (
    BINARY_RELATIONS,
    FAMILIES,
    RELATION_PHRASES,
    RELATIONS,
    Obj,
    Scene,
    WorldConfig,
    article,
    grid_cell,
)

_SPATIAL_QUERY_FRACTION = 0.25  # share of spatial questions asking "what shape is left of ..."
_POSITION_HALF_FRACTION = 0.5  # share of position questions asking "is the X in the left half?"


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


def _asked(cfg: WorldConfig, rels: Sequence[str]) -> tuple[str, ...]:
    return tuple(r for r in rels if r in cfg.relations)


def _spatial_yes_no(
    scene: Scene, rng: np.random.Generator, cfg: WorldConfig, seen: Set[str]
) -> QA | None:
    """ "is the red circle left of the blue square?" for a relation with both answers here."""
    rels = _asked(cfg, RELATIONS if len(scene.objects) >= 3 else BINARY_RELATIONS)
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
    rels = _asked(cfg, RELATIONS if len(objs) >= 3 else BINARY_RELATIONS)
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
            art = article(name)
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
    """A one-hop look-up of one named object's place: "is the red circle in the left half?"
    (balanced yes/no, `_POSITION_HALF_FRACTION` of them) or "what column is the red circle in?"
    (the `text_grid` cell of its centre, the number the text corpus writes after "column")."""
    if rng.random() < _POSITION_HALF_FRACTION:
        qa = _pick_balanced(rng, _fresh(_half_questions(scene), seen))
        if qa is not None:
            return qa
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


def _half_questions(scene: Scene) -> list[QA]:
    """ "is the red circle in the left half?" for every object and half; the centre decides."""
    mid = scene.image_size / 2
    qas = []
    for o in scene.objects:
        for half, inside in (("left", o.x < mid), ("right", o.x >= mid),
                             ("top", o.y < mid), ("bottom", o.y >= mid)):
            q = f"is the {o.name} in the {half} half?"
            qas.append(QA(q, _word(inside), "position", None, "yes/no", "is the", o.name))
    return qas


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
