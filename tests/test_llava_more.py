import json
from pathlib import Path

import numpy as np
import pytest
import torch
from paper_fixtures import (
    D_MODEL,
    IMAGE_SIZE,
    PATCH,
    write_clip,
    write_llava_llama,
)
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM
from vlmdiff.inputs import prompt_texts
from vlmdiff.models.build import load_vlm
from vlmdiff.sources.llava_more import (
    ConversionError,
    convert_llava_llama,
    image_seq_length,
    import_vlm,
    resolve_source,
)

QUESTIONS = ["Is the cat to the left of the dog?", "What colour is the bus?"]


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("llava")
    clip = write_clip(root / "clip")
    raw = write_llava_llama(root / "ckpt", clip)
    return root, clip, raw


@pytest.fixture(scope="module")
def converted(sources):
    root, _, _ = sources
    summary = convert_llava_llama(root / "ckpt", root / "hf", log=lambda s: None)
    model, processor = load_vlm(root / "hf")
    return summary, model, processor


def images():
    rng = np.random.default_rng(0)
    return [
        Image.fromarray(rng.integers(0, 256, (20, 40, 3), dtype=np.uint8)),  # wide: padded
        Image.fromarray(rng.integers(0, 256, (36, 36, 3), dtype=np.uint8)),
    ]


def direct_logits(
    ckpt: Path, clip: Path, raw: dict, batch: dict, image_id: int, select_layer: int | None = None
) -> torch.Tensor:
    """LLaVA's forward from the raw tensors: CLIP hidden state at layer -2 without CLS, the
    2-layer GELU projector in plain tensor math, spliced over the `<image>` positions, Llama."""
    cfg = json.loads((ckpt / "config.json").read_text())
    clip_cfg = json.loads((clip / "config.json").read_text())["vision_config"]
    tower = CLIPVisionModel(CLIPVisionConfig(**clip_cfg)).eval()
    clip_state = load_file(str(clip / "model.safetensors"))
    tower_state = {k.removeprefix("vision_model."): v for k, v in clip_state.items() if k.startswith("vision_model.")}
    missing, unexpected = tower.load_state_dict(tower_state, strict=False)
    assert not unexpected and not [m for m in missing if "position_ids" not in m]
    hidden = tower(batch["pixel_values"], output_hidden_states=True).hidden_states
    layer = cfg["mm_vision_select_layer"] if select_layer is None else select_layer
    feats = hidden[layer][:, 1:]
    p = {k.removeprefix("model.mm_projector."): v for k, v in raw.items() if "mm_projector" in k}
    proj = torch.nn.functional.gelu(feats @ p["0.weight"].T + p["0.bias"]) @ p["2.weight"].T + p["2.bias"]

    fields = {k: v for k, v in cfg.items() if k in LlamaConfig().to_dict() and k != "model_type"}
    lm = LlamaForCausalLM(LlamaConfig(**fields)).eval()
    lm.load_state_dict({k: v for k, v in raw.items() if not k.startswith(("model.mm_", "model.vision_"))})
    ids = batch["input_ids"]
    is_image = ids == image_id
    emb = raw["model.embed_tokens.weight"][ids.clamp(max=cfg["vocab_size"] - 1)]
    emb[is_image] = proj.reshape(-1, proj.shape[-1])
    return lm(inputs_embeds=emb, attention_mask=batch["attention_mask"]).logits


@torch.no_grad()
def test_converted_logits_match_direct_computation(sources, converted):
    root, clip, raw = sources
    summary, model, processor = converted
    texts = prompt_texts(processor.tokenizer, QUESTIONS, with_image=True)
    batch = processor(text=texts, images=images(), return_tensors="pt", padding=True)
    got = model(**batch).logits
    vocab = raw["model.embed_tokens.weight"].shape[0]
    expected = direct_logits(root / "ckpt", clip, raw, batch, summary["image_token_id"])
    mask = batch["attention_mask"].bool()
    assert torch.allclose(got[..., :vocab][mask], expected[mask], atol=1e-4, rtol=1e-4)
    # the check can fail: the tower's last layer instead of LLaVA's -2 gives other logits
    wrong = direct_logits(root / "ckpt", clip, raw, batch, summary["image_token_id"], -1)
    assert not torch.allclose(got[..., :vocab][mask], wrong[mask], atol=1e-3)
    assert got.shape[-1] == vocab + 1  # only <image> added: the pad token is Llama-3's reserved one


@torch.no_grad()
def test_tokenizer_without_a_reserved_pad_token_gets_one_added(sources, tmp_path):
    _, clip, _ = sources
    raw = write_llava_llama(tmp_path / "ckpt", clip, reserved_pad=False)
    summary = convert_llava_llama(tmp_path / "ckpt", tmp_path / "hf", log=lambda s: None)
    model, processor = load_vlm(tmp_path / "hf")
    tok = processor.tokenizer
    vocab = raw["model.embed_tokens.weight"].shape[0]
    assert tok.pad_token == "<pad>" and summary["pad_token"] == "<pad>"
    assert tok.pad_token_id >= vocab and model.config.text_config.pad_token_id == tok.pad_token_id
    assert model.get_input_embeddings().weight.shape[0] == vocab + 2  # <pad> and <image>
    # prompts of different lengths: the shorter one is padded with the new row, and the logits
    # of every real token still match LLaVA's forward from the raw tensors
    texts = prompt_texts(tok, QUESTIONS, with_image=True)
    batch = processor(text=texts, images=images(), return_tensors="pt", padding=True)
    mask = batch["attention_mask"].bool()
    assert (batch["input_ids"][~mask] == tok.pad_token_id).all() and (~mask).any()
    got = model(**batch).logits[..., :vocab]
    expected = direct_logits(tmp_path / "ckpt", clip, raw, batch, summary["image_token_id"])
    assert torch.allclose(got[mask], expected[mask], atol=1e-4, rtol=1e-4)


@torch.no_grad()
def test_image_span_tokenizer_and_template(converted):
    summary, model, processor = converted
    tok = processor.tokenizer
    n = image_seq_length(IMAGE_SIZE, PATCH)
    assert n == (IMAGE_SIZE // PATCH) ** 2 == summary["image_seq_length"] == model.config.image_seq_length
    assert image_seq_length(336, 14) == 576 and image_seq_length(336, 14, "cls_patch") == 577
    text = prompt_texts(tok, QUESTIONS[:1], with_image=True)[0]
    assert "You are a helpful language and vision assistant." in text
    assert "<|start_header_id|>user<|end_header_id|>\n\n<image>\nIs the cat" in text
    assert text.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
    batch = processor(text=[text], images=images()[:1], return_tensors="pt")
    ids = batch["input_ids"][0]
    is_image = ids == model.config.image_token_id
    where = torch.nonzero(is_image).flatten()
    assert len(where) == n and int(where[-1] - where[0]) == n - 1  # one consecutive span
    assert int((ids == tok.bos_token_id).sum()) == 1 and int(ids[0]) == tok.bos_token_id
    assert tok.pad_token == "<|finetune_right_pad_id|>"
    assert model.config.vision_feature_layer == -2
    assert model.config.vision_feature_select_strategy == "default"


def test_processor_pads_to_square_with_mean_colour(converted):
    _, _, processor = converted
    wide = Image.fromarray(np.full((10, 40, 3), 255, np.uint8))
    pix = processor.image_processor(wide, return_tensors="pt")["pixel_values"][0]
    assert pix.shape == (3, IMAGE_SIZE, IMAGE_SIZE)
    # top row is padding (about the mean colour -> ~0 after normalising), middle row is white
    assert pix[:, 0].abs().max() < 0.05
    assert pix[:, IMAGE_SIZE // 2].min() > 1.5


@torch.no_grad()
def test_tower_from_mm_vision_tower_and_stage1_with_base_lm(sources, converted, tmp_path):
    root, clip, raw = sources
    _, ref, processor = converted
    # a stage-1 checkpoint: projector only, tower named by mm_vision_tower, LM from elsewhere
    stage1 = tmp_path / "stage1"
    stage1.mkdir()
    save_file({k: v for k, v in raw.items() if "mm_projector" in k}, str(stage1 / "mm_projector.safetensors"))
    (stage1 / "config.json").write_text((root / "ckpt" / "config.json").read_text())
    with pytest.raises(ConversionError, match="source.lm"):
        convert_llava_llama(stage1, tmp_path / "bad", log=lambda s: None)
    lm_dir = tmp_path / "lm"
    lm_dir.mkdir()
    save_file({k: v for k, v in raw.items() if not k.startswith(("model.mm_", "model.vision_"))},
              str(lm_dir / "model.safetensors"))
    for f in (root / "ckpt").glob("tokenizer*"):
        (lm_dir / f.name).write_bytes(f.read_bytes())
    convert_llava_llama(stage1, tmp_path / "hf1", base_lm=lm_dir, log=lambda s: None)
    model, _ = load_vlm(tmp_path / "hf1")
    texts = prompt_texts(processor.tokenizer, QUESTIONS, with_image=True)
    batch = processor(text=texts, images=images(), return_tensors="pt", padding=True)
    assert torch.allclose(model(**batch).logits, ref(**batch).logits, atol=1e-5)


def test_hf_llava_is_copied_and_bad_sources_are_named(converted, sources, tmp_path):
    root, clip, _ = sources
    summary = import_vlm(str(root / "hf"), tmp_path / "copy", log=lambda s: None)
    assert summary["d_model"] == D_MODEL and (tmp_path / "copy" / "config.json").is_file()
    with pytest.raises(FileNotFoundError, match="source.vlm"):
        resolve_source(str(tmp_path / "nowhere" / "x" / "y"), "source.vlm")
    bad = tmp_path / "bad"
    write_llava_llama(bad, clip, mm_projector_type="linear")
    with pytest.raises(ConversionError, match="mm_projector_type"):
        convert_llava_llama(bad, tmp_path / "out", log=lambda s: None)
    assert not (tmp_path / "out").exists()
