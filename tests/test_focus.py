"""How much of a head's image attention falls on the objects a question names."""

import json

import numpy as np
import pandas as pd
import pytest
from vlmdiff.causal.focus import focus_rows, focus_summary, named_objects, object_patches
from vlmdiff.world.scenes import Obj, Scene


def scene() -> Scene:
    return Scene((Obj("circle", "red", 6, 6, 10), Obj("square", "blue", 30, 30, 12),
                  Obj("triangle", "red", 42, 16, 8)), 48)


def test_named_objects_uses_full_names_only():
    s = scene()
    assert named_objects("is the red circle left of the blue square?", s) == ["red circle",
                                                                             "blue square"]
    assert named_objects("The blue square is above the red triangle.", s) == ["blue square",
                                                                             "red triangle"]
    assert named_objects("what colour is the circle?", s) == []


def test_object_patches_cover_each_box():
    s = scene()
    mask = object_patches(s, ["red circle"], 4)  # 12 px patches; box [1, 11] x [1, 11]
    assert mask.sum() == 1 and mask[0, 0]
    mask = object_patches(s, ["blue square"], 4)  # box [24, 36] x [24, 36]: exactly one patch
    assert mask.sum() == 1 and mask[2, 2]
    mask = object_patches(s, ["red triangle", "red circle"], 4)  # [38, 46] x [12, 20] and ...
    assert {(int(r), int(c)) for r, c in zip(*np.nonzero(mask), strict=True)} == {(0, 0), (1, 3)}
    mask = object_patches(Scene((Obj("circle", "red", 12, 12, 10),), 48), ["red circle"], 4)
    assert mask.sum() == 4  # a box across a patch corner


def test_focus_rows_share_and_even_spread():
    s = json.dumps(scene().to_dict())
    maps = np.zeros((3, 4, 4))
    maps[0, 0, 0], maps[0, 3, 3] = 3.0, 1.0  # three quarters on the red circle's patch
    maps[1] = 1.0  # even
    rows = focus_rows(maps, [s, s, None], ["is the red circle left of the blue square?",
                                           "is the red circle left of the blue square?",
                                           "is the red circle above the blue square?"])
    assert [r["sample"] for r in rows] == [0, 1]  # no scene, no row
    assert rows[0]["share"] == pytest.approx(0.75) and rows[0]["even"] == pytest.approx(2 / 16)
    assert rows[1]["lift"] == pytest.approx(1.0)
    assert rows[0]["objects"] == "red circle, blue square" and rows[0]["object_patches"] == 2


def test_focus_summary_lift_and_interval():
    rows = pd.DataFrame({"feature": "L3/F7", "method": "A", "rank": "top", "layer": 3, "head": 1,
                         "share": [0.5, 0.6, 0.7, 0.4], "even": [0.125] * 4})
    out = focus_summary(rows)
    assert len(out) == 1
    r = out.iloc[0]
    assert r["n"] == 4 and r["lift"] == pytest.approx(0.55 / 0.125)
    assert r["lift_ci_low"] <= r["lift"] <= r["lift_ci_high"]
    assert focus_summary(pd.DataFrame()).empty
