import numpy as np
import pytest
import torch
from datasets import Dataset
from PIL import Image
from vlmdiff.causal import attention
from vlmdiff.causal import attribution as at
from vlmdiff.hooks import language_layers
from vlmdiff.inputs import encode_rows, prompt_span
from vlmdiff.models.build import build_lm, build_vlm, make_processor
from vlmdiff.models.tokenizer import build_tokenizer

QUESTIONS = ["is the red circle left of the blue square?", "is the red circle?", "blue"]


def make_vlm(num_layers: int, zero_mlp: bool = False):
    """A fresh VLM with 4 query heads on 2 key-value heads (grouped-query attention)."""
    tok = build_tokenizer(QUESTIONS + ["yes no"])
    lm_cfg = {"hidden_size": 32, "intermediate_size": 64, "num_layers": num_layers,
              "num_heads": 4, "num_kv_heads": 2, "max_position": 128}
    vision = {"hidden_size": 32, "intermediate_size": 64, "num_layers": 1, "num_heads": 2,
              "patch_size": 8, "feature_layer": -1}
    model = build_vlm(build_lm(tok, lm_cfg, seed=0), tok, vision, 32, seed=0).eval()
    if zero_mlp:  # block output = x + o_proj(heads): linear in the head outputs
        for block in language_layers(model):
            torch.nn.init.zeros_(block.mlp.down_proj.weight)
    proc = make_processor(tok, 32, 8)
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)) for _ in range(3)]
    inputs = encode_rows(Dataset.from_dict({"question": QUESTIONS, "image": images}), 0, 3,
                         mode="vqa", processor=proc)
    return model, proc, images, inputs


@pytest.fixture(scope="module")
def two_layer():
    return make_vlm(2)


def direction(seed: int = 0) -> torch.Tensor:
    v = torch.randn(32, generator=torch.Generator().manual_seed(seed))
    return v / v.norm()


def mean_of(model, proc, images) -> torch.Tensor:
    mean = at.mean_image_embedding(model, proc, images, batch_size=2, device=torch.device("cpu"),
                                   log=lambda _: None)
    assert mean.dims == ("patch", "dim") and mean.shape == (16, 32)
    return torch.from_numpy(mean.values)


def test_probe_is_the_eager_attention(two_layer):
    model, _, _, inputs = two_layer
    with torch.no_grad():
        ref = model(**inputs).logits
        probe = attention.AttentionProbe()
        with attention.probe_attention(model, probe):
            probed = model(**inputs).logits
        after = model(**inputs).logits
    assert torch.allclose(ref, probed, atol=1e-5) and torch.equal(ref, after)
    assert sorted(probe.records) == [0, 1]
    rec = probe.records[0]
    b, s = inputs["input_ids"].shape
    assert rec["query"].shape == rec["key"].shape == (b, 4, s, 8)
    assert rec["output"].shape == (b, s, 4, 8) and rec["pattern"].shape == (b, 4, s, s)
    # grouped-query attention: query heads 0, 1 read KV head 0; heads 2, 3 read KV head 1
    assert torch.equal(rec["key"][:, 0], rec["key"][:, 1])
    assert not torch.equal(rec["key"][:, 1], rec["key"][:, 2])
    assert attention.kv_head_of(4, 2).tolist() == [0, 0, 1, 1]


def test_gqa_bookkeeping(two_layer):
    model, proc, images, inputs = two_layer
    scores, _ = at.attribute(model, inputs, 1, direction(), mean_of(model, proc, images))
    variants = [*at.VARIANTS, at.ATP_STAR]
    s = {v: scores[:, :, variants.index(v)] for v in variants}  # [b, method, layer, head]
    assert np.allclose(s["qk"], s["query"] + s["key"])
    assert np.allclose(s["qk_kv"], s["query"] + s["key_kv"])
    for heads in ([0, 1], [2, 3]):
        group_sum = s["key"][..., heads].sum(-1)
        for h in heads:  # every query head of a group carries the KV head's whole score
            assert np.allclose(s["key_kv"][..., h], group_sum)
    assert not np.allclose(s["key"][..., 0], s["key"][..., 1])


def test_output_scores_equal_exact_patching_when_linear():
    """One layer, MLP zeroed: the layer-0 objective is linear in the head outputs, so both
    methods equal exact one-head patching up to float error."""
    model, proc, images, inputs = make_vlm(1, zero_mlp=True)
    mean = mean_of(model, proc, images)
    v = direction(1)
    scores, objectives = at.attribute(model, inputs, 0, v, mean)
    exact, passes = at.exact_patching(model, inputs, 0, v, mean)
    assert passes == 2 + 2 * 4 * len(at.PATCH_VARIANTS)
    out = at.VARIANTS.index("output")
    for m in (0, 1):  # A: corrupt into clean; B: clean into corrupt
        est = scores[:, m, out, 0]
        true = exact[:, m, at.PATCH_VARIANTS.index("output"), 0]
        assert np.allclose(est, true, rtol=1e-3, atol=1e-6), (m, est, true)
    assert np.abs(exact).max() > 1e-4  # the corruption does change the objective
    # the output scores of all heads add up to the whole change of the objective
    total = objectives[:, 1] - objectives[:, 0]
    assert np.allclose(scores[:, 0, out, 0].sum(-1), total, rtol=1e-3, atol=1e-6)


def test_query_key_gradients_match_finite_differences(two_layer):
    """`(Δq, Δk) · ∇` is the derivative of the objective along the patch direction."""
    model, proc, images, inputs = make_vlm(2)
    model = model.double()  # (RMSNorm still computes in float32: a moderate step size)
    inputs = {**inputs, "pixel_values": inputs["pixel_values"].double()}
    mean, v, layer = mean_of(model, proc, images), direction(2).double(), 1
    span = prompt_span(inputs["input_ids"], inputs["attention_mask"], model.config.image_token_id)
    scores, _ = at.attribute(model, inputs, layer, v, mean)
    runs = {}
    with torch.no_grad():
        for name, m in (("clean", None), ("corr", mean)):
            probe = attention.AttentionProbe()
            j = at.feature_objective(model, inputs, layer, v, span, probe, mean=m)
            runs[name] = (j, probe.records)
        j0, clean = runs["clean"]
        corr = runs["corr"][1]
        eps = 1e-2
        est_all = scores[:, 0, at.VARIANTS.index("qk")]
        for lay, h in ((0, 1), (0, 2), (1, 2), (1, 3)):
            heads = torch.zeros(4, dtype=torch.bool)
            heads[h] = True
            probe = attention.AttentionProbe([])
            probe.patches[lay] = {
                n: (clean[lay][n] + eps * (corr[lay][n] - clean[lay][n]), heads)
                for n in ("query", "key")
            }
            j = at.feature_objective(model, inputs, layer, v, span, probe)
            fd = ((j - j0) / eps).numpy()
            est = scores[:, 0, at.VARIANTS.index("qk"), lay, h]
            assert np.allclose(fd, est, rtol=0.1, atol=0.05 * np.abs(est_all).max()), (lay, h, fd, est)


def test_exact_patching_agrees_with_estimates_in_rank(two_layer):
    import xarray as xr

    model, proc, images, inputs = two_layer
    mean, v = mean_of(model, proc, images), direction(3)
    scores, _ = at.attribute(model, inputs, 1, v, mean)
    exact, _ = at.exact_patching(model, inputs, 1, v, mean)
    coords = {"feature": ["L1F0"], "feature_layer": ("feature", [1]),
              "feature_index": ("feature", [0])}
    sc = xr.DataArray(scores.mean(0)[None], dims=("feature", "method", "variant", "layer", "head"),
                      coords={**coords, "method": list(at.METHODS),
                              "variant": [*at.VARIANTS, at.ATP_STAR]})
    ex = xr.DataArray(exact.mean(0)[None], dims=("feature", "method", "variant", "layer", "head"),
                      coords={**coords, "method": list(at.METHODS),
                              "variant": list(at.PATCH_VARIANTS)})
    table = at.patching_correlations(sc, ex)
    assert len(table) == 3 * 2 and (table["n_heads"] == 8).all()
    assert (table["spearman_own_direction"] > 0.5).all(), table
    # AtP*'s recomputed softmax is at least as close to exact qk patching as the linear qk
    own = table.set_index(["method", "variant"])["spearman_own_direction"]
    assert own[("A", at.ATP_STAR)] >= own[("A", "qk")] - 0.05


def test_attention_maps_sum_to_image_share(two_layer):
    model, proc, images, _ = two_layer
    maps = attention.attention_to_image(model, proc, images, QUESTIONS, [(0, 1), (1, 3)],
                                 device=torch.device("cpu"))
    assert maps.shape == (3, 2, 4, 4)
    assert (maps >= 0).all() and (maps.sum((2, 3)) <= 1 + 1e-5).all()


def test_ranked_heads_and_spearman():
    import xarray as xr

    grid = xr.DataArray([[0.1, -3.0], [2.0, 0.0]], dims=("layer", "head"),
                        coords={"layer": [0, 1], "head": [0, 1]})
    assert at.ranked_heads(grid, 2) == [(0, 1), (1, 0)]
    assert at.ranked_heads(grid, 1, bottom=True) == [(1, 1)]
    assert at.spearman([1, 2, 3], [10, 20, 30]) == pytest.approx(1.0)
    assert np.isnan(at.spearman([1, 1, 1], [1, 2, 3]))
