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
