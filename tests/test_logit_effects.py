"""A feature's logit effects on a tiny VLM built as the workflow builds it."""

import torch
from vlmdiff.interp.logit_effects import logit_effects, unembedding
from vlmdiff.models.build import build_lm, build_vlm
from vlmdiff.models.tokenizer import build_tokenizer


@torch.no_grad()
def test_a_direction_along_a_tokens_unembedding_promotes_that_token(tiny_config):
    tok = build_tokenizer(["is the red circle left of the blue square ?"])
    lm = build_lm(tok, tiny_config["lm"], seed=0)
    vlm = build_vlm(lm, tok, tiny_config["vision"], tiny_config["world"]["scene"]["image_size"],
                    seed=0)
    norm = vlm.get_decoder().norm
    norm.weight.copy_(torch.linspace(0.5, 2.0, norm.weight.numel()))  # a gain that matters
    w_u = unembedding(vlm)
    raw = vlm.get_output_embeddings().weight
    assert torch.allclose(w_u, raw * norm.weight)

    left = tok.convert_tokens_to_ids("left")
    effects = logit_effects(w_u, w_u[left] / w_u[left].norm(), tok, n=3)
    assert effects["promoted"][0][0] == "left"
    assert effects["promoted"][0][1] == round(float(w_u[left].norm()), 4)
    values = [v for _, v in effects["promoted"]]
    assert values == sorted(values, reverse=True) and len(values) == 3
    # the opposite direction suppresses it most
    flipped = logit_effects(w_u, -w_u[left], tok, n=3)
    assert flipped["suppressed"][0][0] == "left" and flipped["suppressed"][0][1] < 0
    assert [v for _, v in flipped["suppressed"]] == sorted(v for _, v in flipped["suppressed"])


@torch.no_grad()
def test_image_token_activations_follow_the_layer_output_on_the_patch_grid(tiny_config):
    import numpy as np
    from datasets import Dataset
    from PIL import Image
    from vlmdiff.inputs import encode_rows
    from vlmdiff.interp.image_acts import image_token_activations
    from vlmdiff.models.build import make_processor
    from vlmdiff.sae.topk import TopKSAE

    tok = build_tokenizer(["is the red circle left of the blue square ?"])
    lm = build_lm(tok, tiny_config["lm"], seed=0)
    size, patch = tiny_config["world"]["scene"]["image_size"], tiny_config["vision"]["patch_size"]
    vlm = build_vlm(lm, tok, tiny_config["vision"], size, seed=0).eval()
    proc = make_processor(tok, size, patch)
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8))
              for _ in range(3)]
    questions = ["is the red circle left ?", "is the blue square left of the red circle ?",
                 "red ?"]  # different lengths: right padding must not shift the image tokens
    d = tiny_config["lm"]["hidden_size"]
    sae = TopKSAE.from_random(d, 4 * d, 8, seed=1)
    # the reference, from the model's own hidden states (block 0's output is hidden_states[1])
    ds = Dataset.from_dict({"question": questions, "image": images})
    inputs = encode_rows(ds, 0, 3, mode="vqa", processor=proc)
    hidden = vlm.model(**inputs, output_hidden_states=True).hidden_states[1]
    is_image = inputs["input_ids"] == vlm.config.image_token_id
    codes = [sae.dense_acts(hidden[i][is_image[i]]) for i in range(3)]
    fires = torch.cat(codes).gt(0).float().mean(0)
    feature = int((fires - 0.5).abs().argmin())  # fires on some image tokens, not all
    assert 0 < fires[feature] < 1

    got = image_token_activations(vlm, proc, images, questions, 0, feature, sae,
                                  device=torch.device("cpu"), batch_size=2)
    grid = size // patch
    assert got.shape == (3, grid, grid)
    for i in range(3):
        expected = codes[i][:, feature].numpy().reshape(grid, grid)
        assert np.allclose(got[i], expected, atol=1e-5)
