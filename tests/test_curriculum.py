import numpy as np
import pytest
import torch
from datasets import Dataset
from PIL import Image
from vlmdiff.inputs import IGNORE, collate, encode_vqa
from vlmdiff.models.build import build_lm, build_vlm, make_processor
from vlmdiff.models.curriculum import Phase, answer_mask, curriculum_batches, phases
from vlmdiff.models.tokenizer import build_tokenizer
from vlmdiff.models.training import train_vlm_stage

TEXTS = ["is the red circle left of the blue square ?", "is the red circle right of the blue square ?",
         "what color is the circle ?", "yes no red blue"]


@pytest.fixture(scope="module")
def conversations(tiny_config):
    """Two conversations: (left of, colour) about one image, (right of) about another."""
    tok = build_tokenizer(TEXTS)
    size = tiny_config["world"]["scene"]["image_size"]
    proc = make_processor(tok, size, tiny_config["vision"]["patch_size"])
    rng = np.random.default_rng(0)
    imgs = [Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)) for _ in range(2)]
    ds = Dataset.from_dict({
        "image_id": [7, 7, 8], "image": [imgs[0], imgs[0], imgs[1]],
        "question": [TEXTS[0], TEXTS[2], TEXTS[1]],
        "multiple_choice_answer": ["yes", "red", "no"],
        "relation": ["left of", "", "right of"],  # the world writes "" off spatial rows
        "family": ["spatial", "colour", "spatial"],
    })
    return tok, proc, ds, encode_vqa(proc, ds)


def _answers(tok, labels):
    return tok.convert_ids_to_tokens(labels[labels != IGNORE].tolist())


def test_each_answer_token_knows_its_row(conversations):
    tok, _, _, enc = conversations
    assert enc.answer_rows[0][enc.answer_rows[0] >= 0].tolist() == [0, 0, 1, 1]  # answer + EOS
    assert enc.answer_rows[1][enc.answer_rows[1] >= 0].tolist() == [2, 2]
    assert ((enc.answer_rows[0] >= 0) == (enc.labels[0] != IGNORE)).all()


def test_a_phase_keeps_other_families_and_its_relations_only(conversations):
    tok, _, ds, enc = conversations
    masked = enc.answers_of(answer_mask(ds["relation"], ds["family"], Phase(1, ("left of",))))
    assert _answers(tok, masked.labels[0]) == ["yes", "</s>", "red", "</s>"]
    assert _answers(tok, masked.labels[1]) == []  # "right of" carries no loss in this phase
    assert torch.equal(masked.input_ids[1], enc.input_ids[1])  # the question is still asked
    assert answer_mask([None, "", "above"], ["count", "colour", "spatial"],
                       Phase(1, ("left of",))).tolist() == [True, True, False]
    alone = enc.answers_of(answer_mask(ds["relation"], ds["family"], Phase(1, ("left of",), ())))
    assert _answers(tok, alone.labels[0]) == ["yes", "</s>"]  # no other family: colour masked too
    some = answer_mask(["", "", "left of"], ["count", "colour", "spatial"], Phase(1, ("above",), ("count",)))
    assert some.tolist() == [True, False, False]
    assert _answers(tok, enc.labels[1]) == ["no", "</s>"]  # the full labels are untouched


def test_curriculum_batches_mask_for_the_phase_steps_then_never(conversations):
    tok, _, ds, enc = conversations

    def make(data):
        while True:
            yield collate(data, range(len(data)), tok.pad_token_id)

    logged = []
    it = curriculum_batches(enc, ds["relation"], ds["family"], [Phase(2, ("left of",))], make, logged.append)
    counts = [int((next(it)["labels"] != IGNORE).sum()) for _ in range(4)]
    assert counts == [4, 4, 6, 6]
    assert "curriculum phase 1: 2 steps" in logged[0] and "(1 of 2 spatial rows)" in logged[0]
    assert "every other family (1 rows)" in logged[0]

    def every(data):
        while True:
            yield collate(data, range(len(data)), tok.pad_token_id)

    it = curriculum_batches(enc, ds["relation"], ds["family"], [Phase(2, ("left of",), ())], every, print)
    first = next(it)
    assert len(first["labels"]) == 1  # the phase draws only the conversation with a left-of answer
    assert int((first["labels"] != IGNORE).sum()) == 2  # and only that answer counts


def test_curriculum_errors_name_the_problem(conversations, tiny_config):
    tok, proc, ds, enc = conversations
    with pytest.raises(ValueError, match="leaves none of vlm.stage2.steps"):
        phases([{"steps": 5, "relations": ["left of"]}], 5, "vlm.stage2")
    with pytest.raises(ValueError, match="unknown relations"):
        phases([{"steps": 1, "relations": ["inside"]}], 5, "vlm.stage2")
    it = curriculum_batches(enc, ds["relation"], ds["family"], [Phase(1, ("above",))], lambda d: iter(()), print)
    with pytest.raises(ValueError, match=r"no question about \['above'\]"):
        next(it)
    lm = build_lm(tok, tiny_config["lm"], seed=0)
    size = tiny_config["world"]["scene"]["image_size"]
    vlm = build_vlm(lm, tok, tiny_config["vision"], size, seed=0)
    optim = {**tiny_config["vlm"]["stage2"], "curriculum": [{"steps": 1, "relations": ["left of"]}]}
    with pytest.raises(ValueError, match="relation and family columns"):
        train_vlm_stage(vlm, proc, ds.remove_columns("relation"), 2, optim, 0, torch.device("cpu"))


def test_stage_two_trains_through_a_curriculum(conversations, tiny_config):
    tok, proc, ds, _ = conversations
    lm = build_lm(tok, tiny_config["lm"], seed=0)
    size = tiny_config["world"]["scene"]["image_size"]
    vlm = build_vlm(lm, tok, tiny_config["vision"], size, seed=0)
    optim = {**tiny_config["vlm"]["stage2"], "steps": 3, "batch_size": 2, "log_every": 1,
             "curriculum": [{"steps": 2, "relations": ["right of"]}]}
    logged = []
    history = train_vlm_stage(vlm, proc, ds, 2, optim, 0, torch.device("cpu"), logged.append)
    assert [h["step"] for h in history] == [1, 2, 3]
    assert any("curriculum phase 1: 2 steps" in m for m in logged)
    assert any("every answer counts" in m for m in logged)


def test_batches_refuse_fewer_sequences_than_a_batch(conversations):
    from vlmdiff.models.training import batches

    tok, _, _, enc = conversations
    with pytest.raises(ValueError, match="fewer than one batch of 4"):
        next(batches(enc, 4, tok.pad_token_id, seed=0))
