"""Tests for the shapes world: labels are recomputed by an independent reference below."""

from __future__ import annotations

import json
import math
import re
from collections import Counter

import numpy as np
import pytest
from vlmdiff.world.drawing import BACKGROUND, draw
from vlmdiff.world.questions import QA, make_questions
from vlmdiff.world.relations import relation_holds
from vlmdiff.world.scenes import (
    FAMILIES,
    PALETTE,
    RELATIONS,
    SHAPES,
    Obj,
    Scene,
    WorldConfig,
    describe,
    sample_scene,
)

CFG = WorldConfig.default()
TOL, NEAR, FAR, GRID = 3.0, 6.0, 28.0, 8

# ---------------------------------------------------------------------------------------------
# Independent reference: relations and answers from plain dicts (Scene.to_dict()), re-derived
# from the documented rules rather than from the library's code.

PHRASE_TO_REL = {
    "left of": "left of",
    "to the left of": "left of",
    "on the left side of": "left of",
    "right of": "right of",
    "to the right of": "right of",
    "on the right side of": "right of",
    "above": "above",
    "over": "above",
    "below": "below",
    "under": "below",
    "beneath": "below",
    "next to": "next to",
    "beside": "next to",
    "far from": "far from",
    "far away from": "far from",
}
PHRASES = "|".join(sorted(PHRASE_TO_REL, key=len, reverse=True))
NAME = r"(\w+ \w+)"


def ref_relation(rel: str, a: dict, b: dict, c: dict | None = None) -> bool:
    if a is b or a is c:
        return False
    if rel == "left of":
        return a["x"] < b["x"] - TOL
    if rel == "right of":
        return a["x"] > b["x"] + TOL
    if rel == "above":
        return a["y"] < b["y"] - TOL
    if rel == "below":
        return a["y"] > b["y"] + TOL
    if rel == "next to":
        ax0, ax1 = a["x"] - a["size"] / 2, a["x"] + a["size"] / 2
        ay0, ay1 = a["y"] - a["size"] / 2, a["y"] + a["size"] / 2
        bx0, bx1 = b["x"] - b["size"] / 2, b["x"] + b["size"] / 2
        by0, by1 = b["y"] - b["size"] / 2, b["y"] + b["size"] / 2
        gx = max(bx0 - ax1, ax0 - bx1, 0.0)
        gy = max(by0 - ay1, ay0 - by1, 0.0)
        return math.sqrt(gx * gx + gy * gy) <= NEAR
    if rel == "far from":
        return math.dist((a["x"], a["y"]), (b["x"], b["y"])) >= FAR
    if rel == "between":
        assert c is not None
        axis = "x" if abs(b["x"] - c["x"]) >= abs(b["y"] - c["y"]) else "y"
        lo, hi = sorted((b[axis], c[axis]))
        return lo + TOL < a[axis] < hi - TOL
    raise AssertionError(rel)


def _by_name(objs: list[dict]) -> dict[str, dict]:
    return {f"{o['colour']} {o['shape']}": o for o in objs}


def _only(items: list[dict]) -> dict:
    assert len(items) == 1, f"reference expects exactly one match, got {len(items)}"
    return items[0]


def _select(objs: list[dict], ref: str) -> list[dict]:
    """Objects a partial name ("circle", "red object", "red circle") refers to."""
    words = ref.split()
    if words[-1] == "object":
        return [o for o in objs if o["colour"] == words[0]]
    if len(words) == 1:
        return [o for o in objs if o["shape"] == words[0]]
    return [o for o in objs if o["colour"] == words[0] and o["shape"] == words[1]]


def ref_answer(scene: dict, question: str) -> tuple[str, str | None]:
    """(answer, relation) of a generated question, parsed back from its text."""
    objs = scene["objects"]
    named = _by_name(objs)
    yn = {True: "yes", False: "no"}
    if m := re.fullmatch(rf"is the {NAME} between the {NAME} and the {NAME}\?", question):
        a, b, c = (named[g] for g in m.groups())
        return yn[ref_relation("between", a, b, c)], "between"
    if m := re.fullmatch(rf"is the {NAME} ({PHRASES}) the {NAME}\?", question):
        rel = PHRASE_TO_REL[m[2]]
        return yn[ref_relation(rel, named[m[1]], named[m[3]])], rel
    where = rf"(?:between the {NAME} and the {NAME}|({PHRASES}) the {NAME})"
    if m := re.fullmatch(rf"what (shape is|colou?r is the object) {where}\?", question):
        if m[2]:
            b, c, rel = named[m[2]], named[m[3]], "between"
            hit = _only([o for o in objs if ref_relation(rel, o, b, c)])
        else:
            rel, b = PHRASE_TO_REL[m[4]], named[m[5]]
            hit = _only([o for o in objs if ref_relation(rel, o, b)])
        return hit["shape" if m[1] == "shape is" else "colour"], rel
    if m := re.fullmatch(r"what colou?r is the (\w+)\?", question):
        return _only(_select(objs, m[1]))["colour"], None
    if m := re.fullmatch(r"what (?:shape is|is the shape of) the (\w+ object)\?", question):
        return _only(_select(objs, m[1]))["shape"], None
    if question == "how many objects are there?":
        return str(len(objs)), None
    if m := re.fullmatch(r"how many (\w+) objects are there\?", question):
        return str(len(_select(objs, f"{m[1]} object"))), None
    if m := re.fullmatch(r"how many (\w+)s are there\?", question):
        return str(len(_select(objs, m[1]))), None
    if m := re.fullmatch(r"is there an? (\w+(?: \w+)?)\?", question):
        return yn[bool(_select(objs, m[1]))], None
    if m := re.fullmatch(rf"(?:what (column|row) is the {NAME} in|in what (column|row) is the {NAME})\?", question):
        axis, name = (m[1], m[2]) if m[1] else (m[3], m[4])
        v = named[name]["x" if axis == "column" else "y"]
        cell = 1 + int(v // (scene["image_size"] / GRID))  # 8 cells of 6 px on a 48 px image
        return str(min(cell, GRID)), None
    if m := re.fullmatch(rf"is the {NAME} in the (left|right|top|bottom) half\?", question):
        o, mid = named[m[1]], scene["image_size"] / 2
        inside = {"left": o["x"] < mid, "right": o["x"] >= mid, "top": o["y"] < mid,
                  "bottom": o["y"] >= mid}[m[2]]
        return yn[inside], None
    if m := re.fullmatch(r"what letter is (?:written )?on the (\w+(?: \w+)?)\?", question):
        text = _only(_select(objs, m[1]))["text"]
        assert text, "asked for the letter of an object without one"
        return text.lower(), None
    raise AssertionError(f"unparsed question: {question!r}")


def obj(x: float, y: float, size: float = 10.0, shape: str = "square", colour: str = "red") -> Obj:
    return Obj(shape, colour, x, y, size, None)


def many_questions(seed: int, n_scenes: int, per_scene: int, cfg: WorldConfig = CFG):
    rng = np.random.default_rng(seed)
    for _ in range(n_scenes):
        scene = sample_scene(rng, cfg)
        for qa in make_questions(scene, rng, cfg, per_scene):
            yield scene, qa


# ---------------------------------------------------------------------------------------------
# Relations: hand-built edge cases


def test_touching_and_overlapping_boxes_are_next_to() -> None:
    a, touching, overlapping = obj(10, 20), obj(20, 20, colour="blue"), obj(15, 20, colour="green")
    assert relation_holds("next to", a, touching, CFG)
    assert relation_holds("next to", a, overlapping, CFG)
    assert relation_holds("left of", a, touching, CFG)  # 10 px apart
    assert relation_holds("left of", a, overlapping, CFG)  # 5 px > tol
    assert not relation_holds("far from", a, touching, CFG)


def test_near_gap_boundary() -> None:
    a = obj(10, 20)
    assert relation_holds("next to", a, obj(26, 20, colour="blue"), CFG)  # gap exactly 6
    assert not relation_holds("next to", a, obj(26.5, 20, colour="blue"), CFG)
    # Diagonal: gaps 5 and 5 -> Euclidean gap 7.07 > 6.
    assert not relation_holds("next to", a, obj(25, 35, colour="blue"), CFG)
    assert relation_holds("next to", a, obj(25, 24, colour="blue"), CFG)


def test_far_from_boundary() -> None:
    a = obj(10, 10)
    assert relation_holds("far from", a, obj(38, 10, colour="blue"), CFG)  # exactly 28
    assert not relation_holds("far from", a, obj(37.9, 10, colour="blue"), CFG)
    assert relation_holds("far from", obj(38, 10, colour="blue"), a, CFG)  # symmetric


@pytest.mark.parametrize("dx", [0.0, 1.0, 3.0])
def test_ties_within_tol_make_both_directions_false(dx: float) -> None:
    a, b = obj(20, 20), obj(20 + dx, 20 + dx, colour="blue")
    for rel in ("left of", "right of", "above", "below"):
        assert not relation_holds(rel, a, b, CFG), (rel, dx)
        assert not relation_holds(rel, b, a, CFG), (rel, dx)


def test_just_beyond_tol_is_directional() -> None:
    a, b = obj(20, 20), obj(23.01, 16.99, colour="blue")
    assert relation_holds("left of", a, b, CFG) and relation_holds("right of", b, a, CFG)
    assert relation_holds("below", a, b, CFG) and relation_holds("above", b, a, CFG)
    assert not relation_holds("right of", a, b, CFG) and not relation_holds("above", a, b, CFG)


def test_between_rules() -> None:
    b, c = obj(10, 10, colour="blue"), obj(40, 12, colour="green")  # x axis: span 30 > 2
    assert relation_holds("between", obj(25, 40), b, CFG, c)  # only the axis matters
    assert relation_holds("between", obj(25, 40), c, CFG, b)  # order of b, c irrelevant
    assert not relation_holds("between", obj(13, 10), b, CFG, c)  # exactly tol inside
    assert relation_holds("between", obj(13.5, 10), b, CFG, c)
    assert not relation_holds("between", obj(37, 10), b, CFG, c)
    assert not relation_holds("between", obj(45, 10), b, CFG, c)
    # b and c tied on both axes within tol: nothing is between them.
    assert not relation_holds("between", obj(11, 11), b, CFG, obj(14, 12, colour="green"))
    # Larger spread along y picks the y axis.
    b2, c2 = obj(10, 5, colour="blue"), obj(14, 45, colour="green")
    assert relation_holds("between", obj(40, 25), b2, CFG, c2)
    assert not relation_holds("between", obj(12, 46), b2, CFG, c2)
    # Equal spans use x.
    b3, c3 = obj(10, 10, colour="blue"), obj(30, 30, colour="green")
    assert relation_holds("between", obj(20, 45), b3, CFG, c3)


def test_relation_arguments_are_checked() -> None:
    a, b = obj(10, 10), obj(30, 10, colour="blue")
    with pytest.raises(ValueError, match="third object"):
        relation_holds("between", a, b, CFG)
    with pytest.raises(ValueError, match="two objects"):
        relation_holds("left of", a, b, CFG, c=obj(40, 10, colour="green"))
    with pytest.raises(ValueError, match="unknown relation"):
        relation_holds("behind", a, b, CFG)
    assert not any(relation_holds(r, a, a, CFG) for r in RELATIONS if r != "between")


def test_library_agrees_with_reference_on_random_pairs() -> None:
    rng = np.random.default_rng(7)
    for _ in range(300):
        scene = sample_scene(rng, CFG)
        objs, dicts = scene.objects, scene.to_dict()["objects"]
        for i, j in np.ndindex(len(objs), len(objs)):
            for rel in RELATIONS[:-1]:
                expect = i != j and ref_relation(rel, dicts[i], dicts[j])
                assert relation_holds(rel, objs[i], objs[j], CFG) == expect
            for k in range(len(objs)):
                if len({i, j, k}) == 3:
                    expect = ref_relation("between", dicts[i], dicts[j], dicts[k])
                    assert relation_holds("between", objs[i], objs[j], CFG, objs[k]) == expect


# ---------------------------------------------------------------------------------------------
# Scenes


def test_scene_sampling_invariants() -> None:
    rng = np.random.default_rng(0)
    counts: Counter[int] = Counter()
    for _ in range(500):
        scene = sample_scene(rng, CFG)
        objs = scene.objects
        counts[len(objs)] += 1
        assert len({(o.colour, o.shape) for o in objs}) == len(objs)
        for o in objs:
            assert o.size / 2 <= o.x <= 48 - o.size / 2 and o.size / 2 <= o.y <= 48 - o.size / 2
            assert 12 <= o.size <= 18 and o.colour in CFG.colours and o.shape in CFG.shapes
            assert o.text is None or o.text in CFG.letters
        for p, q in zip(objs, objs[1:], strict=False):
            half = (p.size + q.size) / 2
            assert max(abs(p.x - q.x) - half, abs(p.y - q.y) - half) >= CFG.min_gap
    assert set(counts) == {1, 2, 3, 4}
    assert min(counts.values()) > 80  # crowded scenes are not under-drawn


def test_scene_json_round_trip() -> None:
    scene = sample_scene(np.random.default_rng(1), WorldConfig.from_mapping({"text_prob": 1.0, "min_objects": 3}))
    again = Scene.from_dict(json.loads(json.dumps(scene.to_dict())))
    assert again == scene


def test_sampling_is_deterministic() -> None:
    a = [sample_scene(np.random.default_rng(5), CFG) for _ in range(3)]
    assert a[0] == a[1] == a[2]
    assert sample_scene(np.random.default_rng(6), CFG) != a[0]


def test_draw_colours_and_background() -> None:
    scene = Scene((obj(12, 12, 14, "square", "blue"), obj(34, 34, 14, "circle", "yellow")), 48)
    img = draw(scene)
    assert img.mode == "RGB" and img.size == (48, 48)
    assert img.getpixel((12, 12)) == PALETTE["blue"]
    assert img.getpixel((34, 34)) == PALETTE["yellow"]
    assert img.getpixel((40, 6)) == BACKGROUND
    lettered = Scene((Obj("square", "yellow", 24, 24, 18, "K"),), 48)
    pixels = np.asarray(draw(lettered))[18:30, 18:30].reshape(-1, 3)
    assert (pixels.sum(axis=1) < 200).sum() > 8  # black ink on yellow


# ---------------------------------------------------------------------------------------------
# Config


def test_config_from_mapping_and_errors() -> None:
    cfg = WorldConfig.from_mapping({"shapes": ["circle", "diamond", "square"], "tol": 2})
    assert cfg.shapes == ("circle", "diamond", "square") and cfg.tol == 2.0
    cfg = WorldConfig.from_mapping({"family_weights": {"ocr": 0}})
    assert cfg.family_weights["ocr"] == 0 and cfg.family_weights["spatial"] == 0.4
    bad = {
        "image_size": ({"image_size": 4}, "image_size"),
        "unknown": ({"colour": ["red"]}, "colour"),
        "colour": ({"colours": ["red", "mauve"]}, "colours"),
        "fit": ({"max_objects": 8}, "max_objects"),
        "shapes": ({"shapes": ["circle", "square"]}, "world.scene.shapes"),  # 3 x 3 > 8 objects
        "size": ({"size_range": [20, 12]}, "size_range"),
        "prob": ({"text_prob": 1.5}, "text_prob"),
        "letters": ({"letters": "ab"}, "letters"),
        "family": ({"family_weights": {"colour": -1}}, "family_weights.colour"),
        "family_name": ({"family_weights": {"colours": 1}}, "family_weights"),
        "minmax": ({"min_objects": 3, "max_objects": 2}, "max_objects"),
    }
    for mapping, key in bad.values():
        with pytest.raises(ValueError, match=re.escape(key)):
            WorldConfig.from_mapping(mapping)


def test_config_is_the_schema_section() -> None:
    """Defaults and names come from schemas/config.schema.yaml's world.scene, nowhere else."""
    from vlmdiff.config import section

    assert WorldConfig.default().to_dict() == section("world.scene")
    scene = section("world.scene")
    assert set(scene["family_weights"]) == set(FAMILIES)
    with pytest.raises(ValueError, match=r"'world\.scene\.max_objects'"):
        WorldConfig.from_mapping({"min_objects": 3, "max_objects": 2})
    with pytest.raises(ValueError, match=r"'world\.scene\.colours\.1'"):
        WorldConfig.from_mapping({"colours": ["red", "mauve", "blue"]})
    from vlmdiff.config import _section

    props = _section("world.scene")[0]["properties"]
    assert props["colours"]["items"]["enum"] == list(PALETTE)
    assert props["shapes"]["items"]["enum"] == list(SHAPES)


# ---------------------------------------------------------------------------------------------
# Questions


def test_answers_match_reference_on_random_scenes() -> None:
    seen_relations: Counter[str] = Counter()
    for scene, qa in many_questions(11, 1500, 3):
        answer, rel = ref_answer(scene.to_dict(), qa.question)
        assert qa.answer == answer, (qa, scene)
        assert qa.relation == rel, qa
        if rel:
            seen_relations[rel] += 1
    assert set(seen_relations) == set(RELATIONS)


def test_qa_fields_are_consistent() -> None:
    types = {"yes/no": r"yes|no", "number": r"[0-9]", "other": r"[a-z]+"}
    for scene, qa in many_questions(12, 400, 4):
        assert re.fullmatch(types[qa.answer_type], qa.answer), qa
        assert qa.question.startswith(qa.question_type), qa
        assert qa.question == qa.question.lower() and qa.question.endswith("?")
        names = {o.name for o in scene.objects}
        if qa.family == "spatial":
            assert qa.subj in names and qa.obj in names
            assert (qa.obj2 is not None) == (qa.relation == "between")
        else:
            assert qa.relation is None


def test_balance_single_words_and_all_families() -> None:
    qas = [qa for _, qa in many_questions(13, 500, 4)]
    assert len(qas) == 2000
    assert all(re.fullmatch(r"[a-z0-9]+", qa.answer) for qa in qas)
    assert set(qa.family for qa in qas) == {f for f in FAMILIES if CFG.family_weights[f] > 0}
    for fam in ("spatial", "existence"):
        answers = [qa.answer for qa in qas if qa.family == fam and qa.answer_type == "yes/no"]
        assert abs(answers.count("yes") / len(answers) - 0.5) < 0.05, fam
    yn = [qa.answer for qa in qas if qa.answer_type == "yes/no"]
    assert abs(yn.count("yes") / len(yn) - 0.5) < 0.04


def test_position_questions_match_reference() -> None:
    """Off by default; when asked, the answer is the text description's cell of the centre."""
    cfg = WorldConfig.from_mapping({"family_weights": {f: 0 for f in FAMILIES} | {"position": 1}})
    cells: Counter[str] = Counter()
    halves: Counter[str] = Counter()
    for scene, qa in many_questions(21, 300, 3, cfg):
        assert qa.family == "position" and qa.question.startswith(qa.question_type), qa
        answer, rel = ref_answer(scene.to_dict(), qa.question)
        assert (qa.answer, qa.relation) == (answer, rel), (qa, scene)
        if qa.answer_type == "yes/no":
            halves[f"{qa.question.split()[-2]} {qa.answer}"] += 1
            continue
        assert qa.answer_type == "number", qa
        axis = "column" if "column" in qa.question else "row"
        text = re.search(rf"{qa.subj} (?:with the letter \w )?at column (\d) row (\d)", describe(scene, cfg))
        assert text[1 if axis == "column" else 2] == qa.answer
        cells[qa.answer] += 1
    # Centres keep half an object (>= 6 px) from the border, so the outer cells stay empty.
    assert set(cells) == {str(k) for k in range(2, GRID)}
    # The half questions are about as many as the cell questions, and balanced per half.
    assert 0.4 < sum(halves.values()) / (sum(halves.values()) + sum(cells.values())) < 0.6
    for half in ("left", "right", "top", "bottom"):
        yes, no = halves[f"{half} yes"], halves[f"{half} no"]
        assert yes > 20 and no > 20 and abs(yes - no) / (yes + no) < 0.3, (half, yes, no)
    assert "position" not in {qa.family for _, qa in many_questions(21, 300, 3)}


def test_relations_key_narrows_the_spatial_family() -> None:
    asked = ["left of", "above"]
    cfg = WorldConfig.from_mapping({"family_weights": {f: 0 for f in FAMILIES} | {"spatial": 1},
                                    "relations": asked})
    qas = [qa for _, qa in many_questions(5, 300, 2, cfg)]
    spatial = [qa for qa in qas if qa.family == "spatial"]
    assert len(spatial) > 400 and {qa.relation for qa in spatial} == set(asked)
    for scene, qa in many_questions(5, 100, 2, cfg):  # answers still right
        if qa.family == "spatial" and qa.answer_type == "yes/no":
            assert ref_answer(scene.to_dict(), qa.question)[0] == qa.answer, qa
    default = WorldConfig.from_mapping({"family_weights": {f: 0 for f in FAMILIES} | {"spatial": 1}})
    assert {qa.relation for _, qa in many_questions(5, 300, 2, default)
            if qa.family == "spatial"} == set(RELATIONS)


def test_questions_in_one_scene_are_distinct() -> None:
    for scene_qas in ([qa for _, qa in many_questions(s, 1, 8)] for s in range(50)):
        assert len({qa.question for qa in scene_qas}) == 8


def test_count_with_one_and_four_objects() -> None:
    cfg = WorldConfig.from_mapping({"family_weights": {f: 0 for f in FAMILIES} | {"count": 1}})
    one = Scene((obj(20, 20, shape="circle", colour="red"),), 48)
    four = Scene(
        (
            obj(10, 10, shape="circle", colour="red"),
            obj(38, 10, shape="circle", colour="blue"),
            obj(10, 38, shape="square", colour="red"),
            obj(38, 38, shape="triangle", colour="green"),
        ),
        48,
    )
    rng = np.random.default_rng(0)
    for scene, n_all in ((one, "1"), (four, "4")):
        qas = make_questions(scene, rng, cfg, 9)
        assert {qa.family for qa in qas} == {"count"}
        for qa in qas:
            assert qa.answer == ref_answer(scene.to_dict(), qa.question)[0]
            if qa.question == "how many objects are there?":
                assert qa.answer == n_all
    got = {qa.question: qa.answer for qa in make_questions(four, rng, cfg, 9)}
    assert got.get("how many circles are there?", "2") == "2"
    assert got.get("how many red objects are there?", "2") == "2"


def test_impossible_families_are_redrawn() -> None:
    weights = {f: 0 for f in FAMILIES} | {"spatial": 1, "ocr": 1, "existence": 1e-9}
    cfg = WorldConfig.from_mapping({"family_weights": weights})
    lone = Scene((obj(20, 20),), 48)  # no second object, no letter
    qas = make_questions(lone, np.random.default_rng(0), cfg, 5)
    assert {qa.family for qa in qas} == {"existence"}


def test_spatial_query_needs_a_unique_answer() -> None:
    # Two objects left of the blue square: "what shape is left of the blue square?" is never asked.
    scene = Scene(
        (
            obj(8, 10, shape="circle", colour="red"),
            obj(8, 38, shape="triangle", colour="green"),
            obj(40, 24, shape="square", colour="blue"),
        ),
        48,
    )
    rng = np.random.default_rng(3)
    cfg = WorldConfig.from_mapping({"family_weights": {f: 0 for f in FAMILIES} | {"spatial": 1}})
    for _ in range(100):
        for qa in make_questions(scene, rng, cfg, 4):
            if qa.answer_type == "other" and qa.relation == "left of":
                assert not qa.question.endswith("the blue square?"), qa
            assert qa.answer == ref_answer(scene.to_dict(), qa.question)[0]


def test_qa_is_a_plain_record() -> None:
    qa = QA("how many objects are there?", "2", "count", None, "number", "how many")
    assert qa.subj is None and qa.obj is None and qa.obj2 is None


# ---------------------------------------------------------------------------------------------
# Text


def test_describe_format_and_grid() -> None:
    scene = Scene(
        (
            Obj("circle", "red", 10.0, 40.0, 12.0, "K"),
            Obj("square", "orange", 47.0, 0.5, 12.0, None),
        ),
        48,
    )
    cfg = WorldConfig.from_mapping({"colours": ["red", "orange", "blue"]})
    text = describe(scene, cfg)
    assert text == (
        "a red circle with the letter k at column 2 row 7 . an orange square at column 8 row 1 ."
    )
    shuffled = {describe(scene, cfg, np.random.default_rng(s)) for s in range(20)}
    assert len(shuffled) == 2
    for t in shuffled:
        assert sorted(re.findall(r"an? [^.]+\.", t)) == sorted(re.findall(r"an? [^.]+\.", text))


def test_describe_matches_token_grammar() -> None:
    obj_re = r"an? \w+ \w+( with the letter [a-z])? at column [1-8] row [1-8] \."
    rng = np.random.default_rng(4)
    for _ in range(200):
        scene = sample_scene(rng, CFG)
        text = describe(scene, CFG, rng)
        assert re.fullmatch(rf"{obj_re}( {obj_re})*", text), text
        assert text.count(" . ") + 1 == len(scene.objects)
