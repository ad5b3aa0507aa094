import json

import numpy as np
import pytest
import torch
from datasets import Dataset
from PIL import Image
from vlmdiff.hooks import language_layers
from vlmdiff.inputs import IGNORE, Encoded, collate, encode_corpus, encode_vqa, user_prompt
from vlmdiff.models.build import (
    POSITION_CODE_KEY,
    ModelLoadError,
    build_lm,
    build_vlm,
    image_position_table,
    load_lm,
    load_vlm,
    make_processor,
    projector,
    save_atomic,
    set_image_position_code,
    sincos_2d,
)
from vlmdiff.models.evaluation import (
    ERROR_KINDS,
    accuracy_table,
    attribute_errors,
    image_token_positions,
    predict_next_token,
    relation_table,
)
from vlmdiff.models.tokenizer import IMAGE_TOKEN, build_tokenizer
from vlmdiff.models.training import OptimConfig, batches, set_stage_trainable, train, with_captions
from vlmdiff.models.vision import patch_place_r2

TEXTS = ["is the red circle left of the blue square ?", "what color is the circle ?",
         "yes no red blue green circle square triangle"]


@pytest.fixture(scope="module")
def tiny(tiny_config):
    tok = build_tokenizer(TEXTS)
    lm = build_lm(tok, tiny_config["lm"], seed=0)
    size = tiny_config["world"]["scene"]["image_size"]
    vlm = build_vlm(lm, tok, tiny_config["vision"], size, seed=0)
    proc = make_processor(tok, size, tiny_config["vision"]["patch_size"])
    return tok, lm, vlm, proc, size


def _images(n, size, seed=0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)) for _ in range(n)]


def test_tokenizer_is_word_level_with_chat_template():
    tok = build_tokenizer(TEXTS)
    msgs = user_prompt("Is the red circle left of the blue square?", with_image=True)
    msgs.append({"role": "assistant", "content": "yes"})
    ids = tok.apply_chat_template(msgs, tokenize=False)
    tokens = tok.convert_ids_to_tokens(tok(ids, add_special_tokens=False).input_ids)
    assert tokens == ["<s>", "<|user|>", IMAGE_TOKEN, "is", "the", "red", "circle", "left", "of",
                      "the", "blue", "square", "?", "<|assistant|>", "yes", "</s>"]
    assert tok.convert_tokens_to_ids("purple") == tok.unk_token_id


def test_vlm_starts_from_the_lm(tiny):
    tok, lm, vlm, proc, size = tiny
    for (name, a), b in zip(lm.model.state_dict().items(),
                            vlm.model.language_model.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert torch.equal(lm.lm_head.weight, vlm.lm_head.weight)
    assert len(language_layers(vlm)) == len(language_layers(lm))


def test_processor_expands_image_to_one_token_per_patch(tiny, tiny_config):
    tok, lm, vlm, proc, size = tiny
    text = tok.apply_chat_template(user_prompt("what color is the circle ?", True), tokenize=False,
                                   add_generation_prompt=True)
    batch = proc(text=[text], images=_images(1, size), return_tensors="pt")
    n_patches = (size // tiny_config["vision"]["patch_size"]) ** 2
    assert int((batch["input_ids"] == vlm.config.image_token_id).sum()) == n_patches
    assert vlm(**batch).logits.shape[1] == batch["input_ids"].shape[1]


def test_save_load_generate(tiny, tmp_path):
    tok, lm, vlm, proc, size = tiny
    save_atomic([vlm, proc], tmp_path / "vlm")
    assert [p.name for p in tmp_path.iterdir()] == ["vlm"]  # no temporary folder left
    model, proc2 = load_vlm(tmp_path / "vlm")
    text = tok.apply_chat_template(user_prompt("what color ?", True), tokenize=False,
                                   add_generation_prompt=True)
    batch = proc2(text=[text], images=_images(1, size), return_tensors="pt")
    out = model.generate(**batch, max_new_tokens=2, do_sample=False)
    assert out.shape[1] == batch["input_ids"].shape[1] + 2
    with torch.no_grad():
        assert torch.allclose(model(**batch).logits, vlm.eval()(**batch).logits, atol=1e-5)


@pytest.mark.parametrize(
    ("file", "damage"),
    [("config.json", "truncate"), ("config.json", "flip"), ("model.safetensors", "truncate"),
     ("model.safetensors", "flip")],
)
@pytest.mark.parametrize("which", ["lm", "vlm"])
def test_damaged_model_folder_fails_naming_it(tiny, tmp_path, which, file, damage):
    tok, lm, vlm, proc, size = tiny
    out = tmp_path / which
    save_atomic([lm, tok] if which == "lm" else [vlm, proc], out)
    raw = bytearray((out / file).read_bytes())
    if damage == "truncate":
        raw = raw[: len(raw) // 2]
    else:  # a byte of the JSON structure, or of the safetensors header
        raw[raw.index(b'"')] ^= 0x80
    (out / file).write_bytes(bytes(raw))
    with pytest.raises(ModelLoadError, match=f"{out}: the saved {which.upper()} cannot be loaded"):
        (load_lm if which == "lm" else load_vlm)(out)


def test_stage1_freezes_language_model(tiny):
    *_, vlm, _, _ = tiny
    params = set_stage_trainable(vlm, 1)
    ids = {id(p) for p in params}
    assert all(id(p) not in ids for p in vlm.model.language_model.parameters())
    assert all(id(p) in ids for p in vlm.model.multi_modal_projector.parameters())
    assert len(set_stage_trainable(vlm, 2)) == len(list(vlm.parameters()))


def test_vqa_labels_cover_only_the_answer(tiny):
    tok, lm, vlm, proc, size = tiny
    ds = Dataset.from_dict({"question": ["what color is the circle ?"] * 2,
                            "image": _images(2, size), "multiple_choice_answer": ["red", "blue"]})
    enc = encode_vqa(proc, ds)
    labels = enc.labels[1]
    kept = labels[labels != IGNORE].tolist()
    assert kept == [tok.convert_tokens_to_ids("blue"), tok.eos_token_id]
    assert enc.pixel_values.shape == (2, 3, size, size)
    batch = collate(enc, [0, 1], tok.pad_token_id)
    assert batch["attention_mask"].sum() == sum(len(x) for x in enc.input_ids)


def test_training_fits_a_tiny_task(tiny):
    tok, *_ = tiny
    lm = build_lm(tok, {"hidden_size": 32, "intermediate_size": 64, "num_layers": 2, "num_heads": 2,
                        "num_kv_heads": 1, "max_position": 64}, seed=1)
    seq = torch.tensor(tok("red blue green circle square", add_special_tokens=False).input_ids)
    data = Encoded([seq] * 8, [seq] * 8)
    cfg = OptimConfig.from_mapping(
        {"steps": 60, "batch_size": 4, "lr": 1e-2, "warmup_steps": 5, "log_every": 20}, "lm.train")
    hist = train(lm, list(lm.parameters()), batches(data, 4, tok.pad_token_id, 0), cfg,
                 torch.device("cpu"), "t", log=lambda m: None)
    assert hist[-1]["loss"] < 0.2 * hist[0]["loss"]


def test_length_pooled_batches_cover_each_epoch_with_less_padding():
    rng = np.random.default_rng(0)
    seqs = [torch.arange(1, int(n) + 1) for n in rng.integers(5, 60, size=256)]
    data = Encoded(seqs, seqs)

    def epoch(pool: int) -> tuple[list[int], float]:
        it = batches(data, 8, 0, seed=3, length_pool=pool)
        lengths, cells = [], 0
        for _ in range(256 // 8):
            mask = next(it)["attention_mask"]
            lengths += mask.sum(dim=1).tolist()
            cells += mask.numel()
        return sorted(lengths), cells / sum(lengths)

    plain_lengths, plain_pad = epoch(1)
    pooled_lengths, pooled_pad = epoch(16)
    every = sorted(len(x) for x in seqs)
    assert plain_lengths == every and pooled_lengths == every  # one epoch = every sample once
    assert pooled_pad < 1.1 < plain_pad


def test_nan_loss_stops_with_tag(tiny):
    tok, *_ = tiny
    lm = build_lm(tok, {"hidden_size": 32, "intermediate_size": 64, "num_layers": 1, "num_heads": 2,
                        "num_kv_heads": 1, "max_position": 64}, seed=1)
    with torch.no_grad():
        lm.lm_head.weight.fill_(float("nan"))
    seq = torch.tensor(tok("red blue", add_special_tokens=False).input_ids)
    cfg = OptimConfig.from_mapping({"steps": 2, "batch_size": 1, "lr": 1e-3}, "lm.train")
    with pytest.raises(FloatingPointError, match="lm-test.*step 1"):
        train(lm, list(lm.parameters()), batches(Encoded([seq], [seq]), 1, 0, 0),
              cfg, torch.device("cpu"), "lm-test", log=lambda m: None)


def test_predictions_and_accuracy_table(tiny):
    tok, lm, vlm, proc, size = tiny
    questions = ["what color is the circle ?"] * 4
    preds = predict_next_token(lm, tok, questions, None, torch.device("cpu"), batch_size=3)
    assert len(preds) == 4 and len(set(preds)) == 1  # same prompt, same greedy token
    vpreds = predict_next_token(vlm, tok, questions, _images(4, size), torch.device("cpu"), 3, proc)
    assert len(vpreds) == 4
    ds = Dataset.from_dict({"family": ["colour", "colour", "spatial", "spatial"],
                            "answer_type": ["other", "other", "yes/no", "yes/no"],
                            "multiple_choice_answer": ["red", "blue", "yes", "no"]})
    table = accuracy_table(ds, {"m": ["red", "red", "yes", "yes"]})
    acc = table.set_index("family")["accuracy"]
    assert acc["colour"] == 0.5 and acc["spatial"] == 0.5 and acc["all"] == 0.5
    assert table.set_index("family").loc["spatial", "majority_baseline"] == 0.5


def test_relation_table_scores_spatial_questions_per_relation():
    ds = Dataset.from_dict({
        "family": ["spatial", "spatial", "spatial", "spatial", "colour"],
        "relation": ["left of", "left of", "above", "above", None],
        "answer_type": ["yes/no", "yes/no", "yes/no", "other", "other"],
        "multiple_choice_answer": ["yes", "no", "yes", "circle", "red"],
    })
    table = relation_table(ds, {"m": ["yes", "yes", "no", "circle", "red"]})
    acc = table.set_index(["relation", "answer_type"])["accuracy"]
    assert acc[("left of", "yes/no")] == 0.5 and acc[("above", "yes/no")] == 0.0
    assert acc[("above", "other")] == 1.0 and acc[("all", "all")] == 0.5  # the colour row is out
    assert table.set_index(["relation", "answer_type"]).loc[("all", "all"), "n"] == 4
    no_rel = relation_table(ds.remove_columns("relation"), {"m": ["yes"] * 5})
    assert list(no_rel["relation"]) == ["all"] and no_rel["n"].tolist() == [0]


def _scene(*objects: tuple[str, str]) -> str:
    return json.dumps({"image_size": 48, "objects": [
        {"shape": s, "colour": c, "x": 10.0 + 12 * k, "y": 10.0, "size": 12.0, "text": None}
        for k, (c, s) in enumerate(objects)]})


def test_attribute_errors_tell_binding_from_perception():
    ds = Dataset.from_dict({
        "family": ["colour", "colour", "colour", "shape", "count"],
        "multiple_choice_answer": ["red", "blue", "Green", "circle", "2"],
        "scene": [_scene(("red", "circle"), ("blue", "square")),
                  _scene(("red", "circle"), ("blue", "square")),
                  _scene(("green", "triangle")),
                  _scene(("red", "circle"), ("red", "square"), ("blue", "triangle")),
                  _scene(("red", "circle"), ("blue", "square"))],
    })
    # another object's colour, correct, a colour not drawn, another object's shape; count: out
    table = attribute_errors(ds, {"m": ["blue", "blue", "yellow", "triangle", "3"]})
    rows = table.set_index(["family", "n_objects"])
    assert rows.loc[("colour", "2"), ["n", "correct", "another object's"]].tolist() == [2, 0.5, 0.5]
    assert rows.loc[("colour", "1"), "not in the scene"] == 1.0
    assert rows.loc[("colour", "all"), "n"] == 3
    assert rows.loc[("shape", "3"), "another object's"] == 1.0
    assert "count" not in set(table["family"])
    assert np.allclose(table[list(ERROR_KINDS)].sum(axis=1), 1.0)
    assert attribute_errors(ds.remove_columns("scene"), {"m": ["red"] * 5}).empty


def test_conversation_per_image(tiny):
    tok, lm, vlm, proc, size = tiny
    imgs = _images(3, size)
    ds = Dataset.from_dict({"image_id": [7, 7, 8], "image": [imgs[0], imgs[0], imgs[2]],
                            "question": ["what color is the circle ?", "is the red circle left ?",
                                         "what color is the circle ?"],
                            "multiple_choice_answer": ["red", "yes", "blue"]})
    enc = encode_vqa(proc, ds)
    assert len(enc) == 2 and enc.pixel_values.shape[0] == 2  # one conversation per image
    first = enc.labels[0][enc.labels[0] != IGNORE].tolist()
    assert tok.convert_ids_to_tokens(first) == ["red", "</s>", "yes", "</s>"]
    n_image = int((enc.input_ids[0] == vlm.config.image_token_id).sum())
    assert n_image == (size // 8) ** 2  # the image appears once, before the first question


def _scene_json(colour, shape, x, y):
    obj = {"shape": shape, "colour": colour, "x": x, "y": y, "size": 8.0, "text": None}
    return __import__("json").dumps({"objects": [obj], "image_size": 32})


def test_captions_one_per_image_and_opening_each_conversation(tiny, tiny_config):
    tok, lm, vlm, proc, size = tiny
    imgs = _images(2, size)
    ds = Dataset.from_dict({
        "image_id": [7, 7, 8], "image": [imgs[0], imgs[0], imgs[1]],
        "question": ["what color is the circle ?", "is the red circle left ?", "what color is the circle ?"],
        "multiple_choice_answer": ["red", "yes", "blue"],
        "scene": [_scene_json("red", "circle", 5, 5)] * 2 + [_scene_json("blue", "square", 20, 9)],
    })
    scene_cfg = tiny_config["world"]["scene"]
    caps = with_captions(ds, scene_cfg)
    assert caps["image_id"] == [7, 8]
    assert caps["multiple_choice_answer"][1].startswith("a blue square at column")
    both = with_captions(ds, scene_cfg, keep_questions=True)
    assert both["image_id"] == [7, 7, 7, 8, 8]
    assert both["question"][0] == both["question"][3] == "describe the image ."
    assert both["multiple_choice_answer"][1:3] == ["red", "yes"]
    enc = encode_vqa(proc, both)
    assert len(enc) == 2  # still one conversation per image, the caption turn first
    answers = tok.convert_ids_to_tokens(enc.labels[1][enc.labels[1] != IGNORE].tolist())
    assert answers[1:3] == ["blue", "square"] and answers[-2:] == ["blue", "</s>"]


def test_corpus_loss_on_answers_or_every_token():
    corpus = Dataset.from_dict({"description": ["a red circle at column 1 row 2 ."],
                                "questions": [["what color is the circle ?", "is there a square ?"]],
                                "answers": [["red", "no"]]})
    tok = build_tokenizer([*TEXTS, "a at column 1 row 2 . there is"])
    answers = encode_corpus(tok, corpus, max_len=64, loss_on="answers")
    kept = tok.convert_ids_to_tokens(answers.labels[0][answers.labels[0] != IGNORE].tolist())
    assert kept == ["red", "</s>", "no", "</s>"]
    every = encode_corpus(tok, corpus, max_len=64, loss_on="all")
    assert torch.equal(every.labels[0], every.input_ids[0])
    with pytest.raises(ValueError, match="loss_on"):
        encode_corpus(tok, corpus, max_len=64, loss_on="description")


def test_sincos_positions_encode_column_and_row(tiny_config):
    table = sincos_2d(4, 32)
    assert table.shape == (16, 32)
    # the first half depends on the column only, the second on the row only (row-major order)
    assert torch.allclose(table[1, :16], table[5, :16]) and not torch.allclose(table[1, 16:], table[5, 16:])
    assert torch.allclose(table[4, 16:], table[5, 16:]) and not torch.allclose(table[4, :16], table[5, :16])
    tok = build_tokenizer(TEXTS)
    lm = build_lm(tok, tiny_config["lm"], seed=0)
    vision = {**tiny_config["vision"], "position_init": "sincos"}
    size = tiny_config["world"]["scene"]["image_size"]
    vlm = build_vlm(lm, tok, vision, size, seed=0)
    pos = vlm.model.vision_tower.embeddings.position_embedding.weight.detach()
    grid = size // vision["patch_size"]
    assert torch.allclose(pos[1:], 0.5 * sincos_2d(grid, vision["hidden_size"]))
    with pytest.raises(ValueError, match="multiple of 4"):
        sincos_2d(4, 30)


def test_image_token_positions_tell_where_a_patch_is(tiny, tiny_config):
    """Plain images through a tower that sees only position embeddings: every stage is a function
    of the patch's place, so probes read it back; without position embeddings, noise images give
    tower features that say nothing about it."""
    tok, lm, vlm, proc, size = tiny
    n_layers = len(language_layers(vlm))
    emb = vlm.model.vision_tower.embeddings
    saved = {k: v.clone() for k, v in vlm.state_dict().items()}
    try:
        with torch.no_grad():
            emb.patch_embedding.weight.zero_()
        plain = [Image.new("RGB", (size, size), (200, 40, 40))] * 12
        table = image_token_positions({"m": (vlm, proc)}, plain, torch.device("cpu"), batch_size=5)
        assert list(table["depth"]) == list(range(-1, n_layers + 1))
        assert list(table["where"][:2]) == ["vision tower", "projector (LM input)"]
        assert (table["n_images"] == 12).all()
        assert (table[["r2_column", "r2_row"]] > 0.95).all().all()
        vlm.load_state_dict(saved)
        with torch.no_grad():
            emb.position_embedding.weight.zero_()
        noise = image_token_positions({"m": (vlm, proc)}, _images(80, size), torch.device("cpu"))
        tower = noise.set_index("where").loc["vision tower"]
        assert tower["r2_column"] < 0.2 and tower["r2_row"] < 0.2
        # causal attention over tokens laid out row by row lets even a fresh LM recover the row
        # (from how many tokens precede), never the column
        last = noise.iloc[-1]
        assert last["r2_row"] > last["r2_column"] + 0.15
    finally:
        vlm.load_state_dict(saved)


def _image_embeddings(vlm, proc, images):
    """The layer-0 image token embeddings (the projector's output, code included) and logits."""
    seen = []
    handle = projector(vlm).register_forward_hook(lambda m, a, out: seen.append(out.detach()))
    texts = [proc.apply_chat_template(user_prompt("what color is the circle ?", with_image=True),
                                      add_generation_prompt=True)] * len(images)
    batch = proc(text=texts, images=images, return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = vlm(**batch).logits
    handle.remove()
    return seen[0], logits


@pytest.fixture(scope="module")
def coded(tiny_config):
    tok = build_tokenizer(TEXTS)
    lm = build_lm(tok, tiny_config["lm"], seed=0)
    size = tiny_config["world"]["scene"]["image_size"]
    proc = make_processor(tok, size, tiny_config["vision"]["patch_size"])
    plain = build_vlm(lm, tok, tiny_config["vision"], size, seed=0).eval()
    vlm = build_vlm(lm, tok, tiny_config["vision"], size, seed=0, position_code="sincos2d",
                    position_scale=1.5).eval()
    return plain, vlm, proc, _images(24, size)


def test_image_position_code_adds_a_fixed_scaled_code_and_none_adds_nothing(coded):
    plain, vlm, proc, images = coded
    assert getattr(plain.config, POSITION_CODE_KEY) == "none"
    assert not hasattr(projector(plain), "position_code")
    base, _ = _image_embeddings(plain, proc, images)
    with_code, _ = _image_embeddings(vlm, proc, images)
    grid = int(base.shape[1] ** 0.5)
    table = image_position_table(grid, base.shape[-1])
    assert torch.allclose(table.mean(0), torch.zeros(base.shape[-1]), atol=1e-6)
    assert table.norm(dim=1).mean() == pytest.approx(1.0)
    # the same weights: the difference is the table, 1.5 times the content's mean token norm
    expected = 1.5 * base.norm(dim=-1).mean() * table
    assert torch.allclose(with_code - base, expected.expand_as(base), atol=1e-5)
    # the code is no parameter: the weights are those of a plain LLaVA
    assert set(vlm.state_dict()) == set(plain.state_dict())


def test_image_position_code_survives_save_and_load(coded, tmp_path):
    _, vlm, proc, images = coded
    save_atomic([vlm, proc], tmp_path / "vlm")
    saved = json.loads((tmp_path / "vlm" / "config.json").read_text())
    assert saved[POSITION_CODE_KEY] == "sincos2d"
    loaded, loaded_proc = load_vlm(tmp_path / "vlm")
    before, logits = _image_embeddings(vlm, proc, images)
    after, logits_loaded = _image_embeddings(loaded, loaded_proc, images)
    assert torch.allclose(before, after, atol=1e-6)
    assert torch.allclose(logits, logits_loaded, atol=1e-5)
    with pytest.raises(ValueError, match="image_position_code must be one of"):
        set_image_position_code(loaded, "onehot", 1.0)


def test_image_tokens_say_their_column_and_row_with_the_code(coded):
    plain, vlm, proc, images = coded
    col, row = patch_place_r2(_image_embeddings(vlm, proc, images)[0])
    assert col >= 0.9 and row >= 0.9
    plain_col, plain_row = patch_place_r2(_image_embeddings(plain, proc, images)[0])
    assert plain_col < col and plain_row < row
