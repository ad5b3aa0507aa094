import json

import pytest
import torch
from vlmdiff.models.build import build_lm, build_vision_tower, build_vlm, make_image_processor
from vlmdiff.models.tokenizer import build_tokenizer
from vlmdiff.models.vision import (
    grid_positions,
    linear_r2,
    patch_labels,
    pretrain_vision,
    unique_images,
)
from vlmdiff.world.datasets import write_world
from vlmdiff.world.layouts import load_split

WORLD = {"image_size": 32, "size_range": [8, 11], "colours": ["red", "green", "blue"],
         "max_objects": 3, "tol": 2.0, "near_gap": 4.0, "far_dist": 18.0}
VISION = {"hidden_size": 32, "intermediate_size": 64, "num_layers": 1, "num_heads": 2, "patch_size": 8, "feature_layer": -1}


@pytest.fixture(scope="module")
def train(tmp_path_factory):
    out = tmp_path_factory.mktemp("world")
    write_world(WORLD, 0, out, n_train=1600, n_val=8, n_vsr=4, n_corpus=4, questions_per_image=2,
                spatial_keywords=["left"], ocr_keywords=["letter"], neutral_prompts=["describe ."],
                log=lambda m: None)
    return load_split(out / "train.parquet")


def test_patch_labels_from_coordinates():
    objects = [{"shape": "square", "colour": "blue", "x": 20.0, "y": 5.0, "size": 8.0, "text": "K"},
               {"shape": "circle", "colour": "red", "x": 31.9, "y": 31.9, "size": 8.0, "text": None}]
    world = {"colours": ["red", "green", "blue"], "shapes": ["circle", "square", "triangle"], "letters": "ABK"}
    labels = patch_labels([json.dumps({"objects": objects, "image_size": 32})], world, 32, 8)
    none = 9  # 3 colours x 3 shapes
    obj = labels["object"][0]
    assert obj[0 * 4 + 2] == 2 * 3 + 1  # blue square: column 2 (x 20 // 8), row 0
    assert obj[3 * 4 + 3] == 0  # red circle in the last patch
    assert (obj == none).sum() == 14
    assert labels["letter"][0, 2] == 3 and labels["letter"][0, 15] == 0  # "K" is letters[2]
    assert torch.allclose(labels["offset"][0, 2], torch.tensor([0.5, 0.625]))


def test_pretraining_learns_objects_and_loads_into_the_vlm(train):
    images = unique_images(train)
    assert len(images) == len(set(train["image_id"]))
    tower = build_vision_tower(VISION, 32, seed=0)
    optim = {"steps": 300, "batch_size": 32, "lr": 3e-3, "warmup_steps": 10, "log_every": 50}
    history, metrics = pretrain_vision(tower, train, make_image_processor(32), {**WORLD, "shapes": ["circle", "square", "triangle"]},
                                       optim, 0, torch.device("cpu"), log=lambda m: None)
    assert history[-1]["loss"] < history[0]["loss"]
    # 10 classes on patches holding an object centre: chance is 0.1
    assert metrics["object_accuracy"] > 0.3 and metrics["empty_accuracy"] > 0.8
    tok = build_tokenizer(["red circle"])
    lm = build_lm(tok, {"hidden_size": 16, "intermediate_size": 32, "num_layers": 1, "num_heads": 2,
                        "num_kv_heads": 1, "max_position": 64}, seed=0)
    vlm = build_vlm(lm, tok, VISION, 32, seed=0, vision_tower=tower)
    for a, b in zip(tower.state_dict().values(), vlm.model.vision_tower.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="vision config"):
        build_vlm(lm, tok, {**VISION, "hidden_size": 16}, 32, seed=0, vision_tower=tower)


def test_grid_positions_and_linear_r2():
    pos = grid_positions(3)
    assert pos.tolist()[:4] == [[0, 0], [0.5, 0], [1, 0], [0, 0.5]] and pos.tolist()[-1] == [1, 1]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2000, 6, generator=g)
    y = torch.stack([x[:, 0] - 2 * x[:, 3], 3 * x[:, 1]], dim=1)
    assert linear_r2(x, y) > 0.999
    assert linear_r2(1e-4 * x, y) > 0.999  # the ridge follows the features' scale
    assert abs(linear_r2(x, torch.randn(2000, 2, generator=g))) < 0.02
    assert abs(linear_r2(x[:, 2:3], y[:, :1])) < 0.02


def test_position_head_keeps_positions_in_the_features(train):
    """Without the head, the tower's own patch features say little about where a patch is."""
    world = {**WORLD, "shapes": ["circle", "square", "triangle"]}
    optim = {"steps": 150, "batch_size": 32, "lr": 3e-3, "warmup_steps": 10, "log_every": 50}
    r2 = {}
    for weight in (0.0, 1.0):
        tower = build_vision_tower({**VISION, "position_init": "random"}, 32, seed=0)
        _, metrics = pretrain_vision(tower, train, make_image_processor(32), world,
                                     {**optim, "position_weight": weight}, 0, torch.device("cpu"), log=lambda m: None)
        r2[weight] = metrics["position_r2"]
    assert r2[1.0] > 0.9
    assert r2[1.0] > r2[0.0] + 0.1
