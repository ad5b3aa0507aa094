"""The text relation probe of research/probe.py (a research script, not part of the library)."""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "research"))
from probe import (  # noqa: E402
    PARTS,
    answer_parts,
    main,
    ordered_description,
    parts_agreement,
    probe_world,
    relation_accuracy,
    relation_corpus,
    relation_question,
    run_probe,
)
from vlmdiff.inputs import Encoded
from vlmdiff.models.build import build_lm
from vlmdiff.models.tokenizer import build_tokenizer
from vlmdiff.models.training import OptimConfig, batches, train
from vlmdiff.world.relations import relation_holds
from vlmdiff.world.scenes import RELATIONS, describe, sample_scene

LEFT_RIGHT = ["left of", "right of"]


def _entries(description: str) -> list[str]:
    """Object names in description order ("a red circle ... ." -> "red circle")."""
    return [" ".join(part.split()[1:3]) for part in description.split(" .") if part.strip()]


def test_probe_world_asks_spatial_questions_of_two_or_more_objects():
    cfg = probe_world({"min_objects": 1, "max_objects": 4}, LEFT_RIGHT)
    assert cfg.min_objects == 2 and cfg.family_weights["spatial"] == 1.0
    assert sum(cfg.family_weights.values()) == 1.0
    assert probe_world({}, ["between"]).min_objects == 3
    with pytest.raises(ValueError, match="subset of"):
        probe_world({}, ["inside"])


def test_question_order_names_the_asked_objects_first_shuffled_does_not():
    cfg = probe_world({}, RELATIONS)
    rng = np.random.default_rng(0)
    first_is_subject = []
    for _ in range(300):
        scene = sample_scene(rng, cfg)
        qa = relation_question(scene, rng, cfg, RELATIONS)
        named = [n for n in (qa.subj, qa.obj, qa.obj2) if n is not None]
        ordered = _entries(ordered_description(scene, qa, cfg, rng, "question"))
        assert ordered[: len(named)] == named
        assert sorted(ordered) == sorted(o.name for o in scene.objects)
        # same words as the corpus's own description, only the order differs
        shuffled = ordered_description(scene, qa, cfg, rng, "shuffled")
        assert sorted(shuffled.split()) == sorted(describe(scene, cfg).split())
        first_is_subject.append(_entries(shuffled)[0] == qa.subj)
    assert 0.2 < np.mean(first_is_subject) < 0.5  # 1 / (2-4 objects) on average
    with pytest.raises(ValueError, match="order"):
        ordered_description(scene, qa, cfg, rng, "sorted")


def test_relation_corpus_is_balanced_yes_no_with_true_answers():
    cfg = probe_world({}, LEFT_RIGHT)
    rng = np.random.default_rng(1)
    ds = relation_corpus(cfg, rng, 400, "question", LEFT_RIGHT)
    assert set(ds["relation"]) == set(LEFT_RIGHT)
    answers = [a[0] for a in ds["answers"]]
    assert set(answers) == {"yes", "no"} and 0.4 < np.mean([a == "yes" for a in answers]) < 0.6
    # in question order the first two entries are the two objects: their cells decide the answer
    for desc, q, a in zip(ds["description"], ds["questions"], answers, strict=True):
        cols = [int(p.split("column")[1].split()[0]) for p in desc.split(" .") if p.strip()]
        if abs(cols[0] - cols[1]) >= 2:  # cells 6 px wide: centres > tol (3 px) apart
            left = cols[0] < cols[1]
            assert a == ("yes" if left == ("left" in q[0]) else "no"), (desc, q)


def test_relation_accuracy_per_relation_and_all():
    acc = relation_accuracy(["a", "a", "b"], ["yes", "no", "no"], ["yes", "yes", "no"])
    assert acc == {"acc/a": 0.5, "acc/b": 1.0, "acc/all": pytest.approx(2 / 3)}


def test_train_calls_on_log_in_eval_mode_and_records_its_values():
    tok = build_tokenizer(["red blue green circle square"])
    lm = build_lm(tok, {"hidden_size": 16, "intermediate_size": 32, "num_layers": 1, "num_heads": 2,
                        "num_kv_heads": 1, "max_position": 16}, seed=0)
    seq = torch.tensor(tok("red blue green", add_special_tokens=False).input_ids)
    calls = []

    def on_log(step):
        calls.append((step, lm.training))
        return {"score": float(step)}

    cfg = OptimConfig.from_mapping(
        {"steps": 5, "batch_size": 1, "lr": 1e-3, "warmup_steps": 1, "log_every": 2}, "lm.train")
    hist = train(lm, list(lm.parameters()), batches(Encoded([seq], [seq]), 1, 0, 0), cfg,
                 torch.device("cpu"), "t", log=lambda m: None, on_log=on_log)
    assert calls == [(2, False), (4, False), (5, False)]
    assert [h["score"] for h in hist] == [2.0, 4.0, 5.0]


def test_probe_learns_comparison_when_no_binding_is_needed(tiny_config):
    """Positive control: with the asked objects listed first, a 2-layer LM learns left/right."""
    lm = dict(tiny_config["lm"], hidden_size=64, intermediate_size=192, num_heads=4,
              num_kv_heads=2, init_std=0.1)
    lm["train"] = {"steps": 400, "batch_size": 64, "lr": 3e-3, "warmup_steps": 30,
                   "log_every": 200}
    table = run_probe({"max_objects": 2}, lm, "question", LEFT_RIGHT, n_train=3000, n_eval=300,
                      seed=0, log=lambda m: None)
    assert list(table.columns) == ["order", "step", "loss", "relation", "accuracy", "n"]
    assert set(table.relation) == {*LEFT_RIGHT, "all"}
    final = table[(table.step == 400) & (table.relation == "all")]
    assert final.n.item() == 300
    # 0.99, 0.94, 0.97, 0.89 with seeds 0-3 (chance 0.5; 8,000 scenes in shuffled order: 0.48)
    assert final.accuracy.item() > 0.8


def test_cli_writes_the_table(tmp_path):
    out = tmp_path / "probe.csv"
    table = main(["--order", "question", "--relations", "above", "--steps", "2", "--log-every",
                  "1", "--layers", "1", "--max-objects", "2", "--train-scenes", "64",
                  "--eval-scenes", "16", "--batch-size", "8", "--device", "cpu", "--out", str(out)])
    assert out.is_file() and len(table) == 2 * 2  # two log steps x (above, all)
    assert set(table.relation) == {"above", "all"}


def test_relation_question_answers_hold():
    cfg = probe_world({}, ["next to", "far from"])
    rng = np.random.default_rng(2)
    for _ in range(100):
        scene = sample_scene(rng, cfg)
        qa = relation_question(scene, rng, cfg, ["next to", "far from"])
        if qa is None:
            continue
        by_name = {o.name: o for o in scene.objects}
        holds = relation_holds(qa.relation, by_name[qa.subj], by_name[qa.obj], cfg)
        assert qa.answer == ("yes" if holds else "no")


def test_held_out_scenes_repeat_no_training_scene():
    # a 2 x 2 text grid and two objects make repeats common
    cfg = probe_world({"max_objects": 2, "text_grid": 2, "colours": ["red", "green", "blue"]},
                      LEFT_RIGHT)
    rng = np.random.default_rng(3)
    train_ds = relation_corpus(cfg, rng, 300, "shuffled", LEFT_RIGHT)

    def pairs(ds):
        return set(zip(ds["description"], (q[0] for q in ds["questions"]), strict=True))

    fresh = relation_corpus(cfg, rng, 300, "shuffled", LEFT_RIGHT)
    assert pairs(fresh) & pairs(train_ds)  # without `exclude`, repeats do occur
    held = relation_corpus(cfg, rng, 300, "shuffled", LEFT_RIGHT, exclude=train_ds)
    assert len(held) == 300 and not pairs(held) & pairs(train_ds)


def test_answer_is_the_parity_of_its_parts_and_no_smaller_set_predicts_it():
    parts = answer_parts({}, 1500, ["left of", "right of", "above", "below"], seed=1)
    assert len(parts) == 1500 and set(parts.relation) == {"left of", "right of", "above", "below"}
    off = parts[~parts.tie]
    parity = off.subject_first ^ off.first_lower ^ off.asks_lower
    assert (parity == off.yes).all() or (parity != off.yes).all()
    table = parts_agreement(parts).set_index("parts").agreement
    assert table[" ^ ".join(PARTS)] == 1.0
    smaller = table.drop(" ^ ".join(PARTS))
    assert len(smaller) == 6 and smaller.max() < 0.56  # chance, up to sampling noise


def test_question_order_puts_the_subject_first_and_leaves_a_two_part_parity():
    parts = answer_parts({}, 300, LEFT_RIGHT, order="question", seed=2)
    assert parts.subject_first.all()
    table = parts_agreement(parts).set_index("parts").agreement
    assert table["first_lower ^ asks_lower"] == 1.0


def test_answer_parts_reject_relations_without_an_axis():
    with pytest.raises(ValueError, match="next to"):
        answer_parts({}, 10, ["left of", "next to"])


def test_cli_parts_trains_nothing_and_writes_the_table(tmp_path):
    out = tmp_path / "parts.csv"
    table = main(["--parts", "60", "--order", "both", "--relations", "above", "below",
                  "--out", str(out)])
    assert out.is_file() and len(table) == 2 * 7  # two orders x seven sets of parts
    assert set(table.order) == {"shuffled", "question"}
