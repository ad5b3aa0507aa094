"""The stage-2 probe of research/stage2_probe.py: its diet, phases and held-out set (a research
script, not part of the library)."""

import sys
from pathlib import Path

import numpy as np
import pytest
from vlmdiff.inputs import IGNORE
from vlmdiff.models.build import make_processor
from vlmdiff.models.tokenizer import build_tokenizer
from vlmdiff.world.drawing import draw
from vlmdiff.world.scenes import RELATIONS, WorldConfig, grid_cell, sample_scene

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "research"))
from stage2_probe import batches, conversation, heldout_left_of, parse_phases  # noqa: E402


@pytest.fixture(scope="module")
def world(tiny_config):
    scene = {**tiny_config["world"]["scene"], "min_objects": 2,
             "family_weights": {"spatial": 1.0, "colour": 0.0, "shape": 0.0, "count": 0.0,
                                "existence": 0.0, "ocr": 0.0, "position": 0.0}}
    rng = np.random.default_rng(0)
    scenes = [sample_scene(rng, WorldConfig.from_mapping(scene)) for _ in range(30)]
    return scene, scenes, [draw(s) for s in scenes], tiny_config


def _questions(processor, batch):
    tok = processor.tokenizer
    return [tok.decode(ids) for ids in batch["input_ids"]]


def test_a_phase_draws_from_its_own_relations_then_the_world_resumes(world, tmp_path):
    scene, scenes, images, cfg = world
    phase = tmp_path / "left.yaml"
    phase.write_text("world:\n  scene:\n    family_weights: {spatial: 1.0, colour: 0, shape: 0, count: 0,"
                     " existence: 0, ocr: 0, position: 0}\n    relations: [left of]\n")
    words = [*RELATIONS, "is the to on side of over under beneath away yes no what ? ."] + [
        " ".join(scene["colours"] + scene["shapes"] + ["object", "letter", "with", "shape"])]
    tok = build_tokenizer(words)
    proc = make_processor(tok, scene["image_size"], cfg["vision"]["patch_size"])
    plan = parse_phases([f"{phase}:2"])
    it = batches(proc, scenes, images, WorldConfig.from_mapping(scene), plan, batch_size=8,
                 turns=2, left_of=False, seed=0)
    early = [q for _ in range(2) for q in _questions(proc, next(it))]
    late = [q for _ in range(6) for q in _questions(proc, next(it))]
    assert all("right" not in q and "above" not in q and "below" not in q for q in early)
    assert any(w in q for q in late for w in ("right", "above", "below", "over", "under"))
    batch = next(it)
    assert (batch["labels"] != IGNORE).sum() == 8 * 2 * 2  # two answers (+ EOS) per conversation
    with pytest.raises(SystemExit, match="must rise"):
        parse_phases([f"{phase}:5", f"{phase}:3"])


def test_heldout_left_of_is_balanced_per_scene(world):
    scene, scenes, _, _ = world
    items = heldout_left_of(scenes, WorldConfig.from_mapping(scene))
    answers = [a for _, _, a in items]
    assert items and answers.count("yes") == answers.count("no")


def test_grounding_asks_both_objects_places_before_the_relation(world):
    scene, scenes, _, _ = world
    cfg = WorldConfig.from_mapping({**scene, "relations": ["left of", "above"]})
    rng = np.random.default_rng(1)
    seen = 0
    for s in scenes:
        conv = conversation(s, cfg, rng, 1, False, grounding=True)
        if not conv or len(conv) == 1:
            continue
        (q1, a1), (q2, a2), (q3, _) = conv
        axis = "column" if "left" in q3 else "row"
        objs = {o.name: o for o in s.objects}
        for q, a in ((q1, a1), (q2, a2)):
            name = q.removeprefix(f"what {axis} is the ").removesuffix(" in?")
            o = objs[name]
            assert a == str(grid_cell(o.x if axis == "column" else o.y, s.image_size, cfg.text_grid))
        subj, obj = q1[len(f"what {axis} is the "):-4], q2[len(f"what {axis} is the "):-4]
        assert q3.index(subj) < q3.index(obj)
        seen += 1
    assert seen >= 10
