"""Spatial relations between two objects of a scene, computed from their boxes.

`relation_holds` states the exact rules (ties and tolerances included); every spatial answer
of the world comes from it.
"""

from __future__ import annotations

import math

from vlmdiff.world.scenes import BINARY_RELATIONS, RELATIONS, Obj, WorldConfig

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
