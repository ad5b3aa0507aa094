"""The patch-vector probe of research/patch_probe.py: its questions, held-out set, inputs and the
position code it adds (a research script, not part of the library)."""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from vlmdiff.models.build import build_lm, image_position_table
from vlmdiff.models.tokenizer import IMAGE_TOKEN, build_tokenizer
from vlmdiff.world.scenes import Obj, Scene, WorldConfig, grid_cell

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "research"))
from patch_probe import PatchLM, balanced, column_questions, encode, left_of_questions  # noqa: E402


@pytest.fixture(scope="module")
def cfg(tiny_config):
    return WorldConfig.from_mapping(tiny_config["world"]["scene"])


def test_left_of_questions_skip_ties_and_answer_from_the_coordinates(cfg):
    a = Obj("circle", "red", 5.0, 10.0, 8.0)
    b = Obj("square", "blue", 20.0, 10.0, 8.0)
    tie = Obj("triangle", "green", 5.0 + cfg.tol / 2, 25.0, 8.0)
    qas = dict(left_of_questions(Scene((a, b, tie), 32), cfg))
    assert qas["is the red circle left of the blue square ?"] == "yes"
    assert qas["is the blue square left of the red circle ?"] == "no"
    assert not any("green triangle" in q and "red circle" in q for q in qas)  # a tie
    assert len(qas) == 4  # a-b both ways, b-tie both ways
    cells = [str(grid_cell(o.x, 32, cfg.text_grid)) for o in (a, b)]
    assert cells[0] < cells[1]
    assert dict(column_questions(Scene((a, b), 32), cfg)) == {
        "what column is the red circle in ?": cells[0], "what column is the blue square in ?": cells[1]}


def test_balanced_draws_each_answer_alike():
    rng = np.random.default_rng(0)
    qas = [("q1", "yes"), ("q2", "yes"), ("q3", "yes"), ("q4", "no")]
    answers = [balanced(qas, rng)[1] for _ in range(2000)]
    assert abs(answers.count("no") / 2000 - 0.5) < 0.05
    assert balanced([], rng) is None


def test_patch_lm_puts_the_code_on_the_image_tokens_only(tiny_config):
    tok = build_tokenizer(["is the red circle left of the blue square ? yes no"])
    lm = build_lm(tok, tiny_config["lm"], seed=0)
    before, after, mask = encode(tok, ["is the red circle left of the blue square ?", "yes ?"])
    assert IMAGE_TOKEN not in tok.convert_ids_to_tokens(before[0].tolist() + after[0].tolist())
    assert mask.sum(1).tolist() == [len(after[0]), int(mask[1].sum())] and mask[1].sum() < mask[0].sum()
    feats = torch.randn(2, 16, 12)
    plain, coded = PatchLM(lm, 12, 16, 0.0), PatchLM(lm, 12, 16, 2.0)
    coded.proj.load_state_dict(plain.proj.state_dict())
    seen = {}
    emb = lm.get_input_embeddings()

    def record(_module, _args, kwargs):
        seen[len(seen)] = kwargs["inputs_embeds"].detach()

    handle = lm.model.register_forward_pre_hook(record, with_kwargs=True)
    plain(feats, before, after, mask), coded(feats, before, after, mask)
    handle.remove()
    diff = seen[1] - seen[0]
    n = before.shape[1]
    image = plain.proj(feats).detach()
    expected = 2.0 * image.norm(dim=-1).mean() * image_position_table(4, lm.config.hidden_size)
    assert torch.allclose(diff[:, n:n + 16], expected.expand(2, -1, -1), atol=1e-5)
    assert torch.equal(diff[:, :n], torch.zeros_like(diff[:, :n]))
    assert torch.equal(diff[:, n + 16:], torch.zeros_like(diff[:, n + 16:]))
    assert torch.equal(seen[0][:, :n], emb(before))


def test_mlp_projector_is_the_vlms_shape(tiny_config):
    tok = build_tokenizer(["yes no"])
    lm = build_lm(tok, tiny_config["lm"], seed=0)
    mlp = PatchLM(lm, 12, 16, 1.0, projector="mlp")
    d = lm.config.hidden_size
    assert [tuple(p.shape) for p in mlp.proj.parameters()] == [(d, 12), (d,), (d, d), (d,)]
    assert mlp.proj(torch.randn(2, 16, 12)).shape == (2, 16, d)
