"""Stages 2–3: streamed statistics, odds ratios, the global percentile, selection, the lexical
filter on a model built so that one feature reads a word and another the image."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
import xarray as xr
import zarr
from datasets import Dataset
from PIL import Image
from vlmdiff.cache.store import HOOK_POINT
from vlmdiff.features.ground_truth import ground_truth
from vlmdiff.features.selection import (
    adapted_mask,
    candidate_mask,
    cosine_threshold,
    feature_statistics,
    odds_ratio,
    select_features,
    selected_table,
    set_summary,
    threshold_sweep,
)
from vlmdiff.features.stats import layer_statistics, prompt_token_mask, split_statistics
from vlmdiff.sae.topk import TopKSAE

torch.set_num_threads(1)
D_MODEL, D_SAE, K = 8, 16, 4


# ----------------------------------------------------------------------------- streamed sums


def write_store(path, samples: list[tuple[int, int]], seed: int, chunk: int = 5) -> None:
    """A finished cache store in the `write_cache` layout: per sample (image, text) tokens,
    image tokens first at positions 1.., then text; one layer of random activations."""
    rng = np.random.default_rng(seed)
    sample, position, is_image = [], [], []
    for row, (n_image, n_text) in samples:
        sample += [row] * (n_image + n_text)
        position += list(range(1, n_image + n_text + 1))
        is_image += [True] * n_image + [False] * n_text
    n = len(sample)
    group = zarr.open_group(path, mode="w", zarr_format=3)
    acts = rng.standard_normal((n, D_MODEL)).astype(np.float16)
    group.create_array(
        "layer_0", data=acts, chunks=(chunk, D_MODEL), dimension_names=("token", "d_model")
    )
    meta = {
        "sample": (sample, "int64"),
        "position": (position, "int32"),
        "token_id": ([0] * n, "int32"),
        "is_image": (is_image, "bool"),
    }
    for name, (values, dtype) in meta.items():
        group.create_array(
            name, data=np.asarray(values, dtype=dtype), chunks=(chunk,), dimension_names=("token",)
        )
    group.attrs.update({"hook_point": HOOK_POINT, "n_layers": 1, "complete": True})


def read_store(path) -> dict[str, np.ndarray]:
    group = zarr.open_group(path, mode="r")
    return {name: group[name][:] for name in ("layer_0", "sample", "position", "is_image")}


@pytest.fixture
def stores(tmp_path):
    # two shards; samples cross chunk boundaries (chunk = 5 tokens); sample 4 has no image
    a = tmp_path / "shard0.zarr"
    b = tmp_path / "shard1.zarr"
    write_store(a, [(0, (3, 4)), (1, (3, 2)), (2, (2, 7))], seed=1)
    write_store(b, [(3, (3, 3)), (4, (0, 5)), (5, (3, 1)), (6, (2, 6))], seed=2)
    return [a, b]


def test_prompt_token_mask():
    sample = np.array([0, 0, 0, 0, 1, 1, 2, 2, 2])
    position = np.array([1, 2, 3, 4, 1, 2, 1, 2, 3])
    is_image = np.array([0, 1, 1, 0, 0, 0, 0, 1, 0], bool)
    # sample 0: text before the image does not count; sample 1 has no image: all its text counts
    expected = np.array([0, 0, 0, 1, 1, 1, 0, 0, 1], bool)
    np.testing.assert_array_equal(prompt_token_mask(sample, position, is_image), expected)


def test_statistics_match_a_direct_computation(stores):
    sae = TopKSAE.from_random(D_MODEL, D_SAE, K, seed=3)
    with torch.no_grad():
        sae.b_enc.fill_(-1.5)  # many top-k values are zero: those tokens must not count
    n_top = 5
    got = split_statistics(stores, 0, sae, batch_tokens=4, n_top=n_top)

    parts = [read_store(p) for p in stores]
    data = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    with torch.no_grad():
        h = sae.dense_acts(torch.from_numpy(data["layer_0"].astype(np.float32))).numpy()
    img = data["is_image"]
    np.testing.assert_array_equal(
        got["n_fire"], np.stack([(h[~img] > 0).sum(0), (h[img] > 0).sum(0)])
    )
    np.testing.assert_allclose(
        got["sum_sq"], np.stack([(h[~img] ** 2).sum(0), (h[img] ** 2).sum(0)]), rtol=1e-5
    )
    np.testing.assert_array_equal(got["n_tokens"], [(~img).sum(), img.sum()])
    assert got["n_samples"] == 7

    prompt = np.zeros(len(img), bool)  # text tokens after each sample's last image token
    for s in np.unique(data["sample"]):
        rows = data["sample"] == s
        last = data["position"][rows & img].max(initial=0)
        prompt |= rows & ~img & (data["position"] > last)
    samples = np.unique(data["sample"])
    best = np.stack(
        [np.where(prompt[:, None] & (data["sample"] == s)[:, None], h, 0).max(0) for s in samples]
    )  # [sample, feature]
    order = np.argsort(-best, axis=0, kind="stable")[:n_top]
    top = np.take_along_axis(best, order, 0)
    np.testing.assert_allclose(got["top_value"], top, rtol=1e-5)
    expected_sample = np.where(top > 0, samples[order], -1)
    np.testing.assert_array_equal(got["top_sample"], expected_sample)
    assert (got["top_sample"] == -1).any() and (got["top_sample"] >= 0).any()


def test_layer_statistics_dataset(stores):
    sae = TopKSAE.from_random(D_MODEL, D_SAE, K, seed=3)
    ds = layer_statistics(
        {"val": stores, "spatial": stores[1:]}, 0, sae, batch_tokens=64, n_top=2, log=lambda m: None
    )
    assert ds["n_fire"].dims == ("split", "token_type", "feature")
    assert list(ds["split"].values) == ["val", "spatial"]
    assert int(ds["n_tokens"].sel(split="val").sum()) == 44
    np.testing.assert_array_equal(
        ds["n_fire"].sel(split="spatial").values,
        split_statistics(stores[1:], 0, sae, batch_tokens=3, n_top=2)["n_fire"],
    )


# ----------------------------------------------------------------------------- per-feature table


def stats_dataset(n_fire: np.ndarray, n_tokens: np.ndarray, sum_sq: np.ndarray) -> xr.Dataset:
    """Statistics as `read_statistics` gives them: n_fire/sum_sq [layer, split, token, feature]."""
    return xr.Dataset(
        {
            "n_fire": (("layer", "split", "token_type", "feature"), n_fire),
            "sum_sq": (("layer", "split", "token_type", "feature"), sum_sq),
            "n_tokens": (("layer", "split", "token_type"), n_tokens),
        },
        coords={
            "layer": np.arange(n_fire.shape[0]),
            "split": ["val", "spatial", "ocr"],
            "token_type": ["text", "image"],
            "feature": np.arange(n_fire.shape[3]),
        },
    )


def test_feature_table_against_formulas():
    rng = np.random.default_rng(0)
    n_tokens = np.array([[1000, 500], [300, 150], [200, 100]])[None].repeat(2, 0)
    n_fire = (rng.uniform(0, 0.3, (2, 3, 2, 5)) * n_tokens[..., None]).astype(np.int64)
    sum_sq = rng.uniform(0, 2, (2, 3, 2, 5))
    cosine = xr.DataArray(
        rng.uniform(0, 1, (2, 5)),
        dims=("layer", "feature"),
        coords={"layer": [0, 1], "feature": np.arange(5)},
    )
    table = feature_statistics(stats_dataset(n_fire, n_tokens, sum_sq), cosine, tokens="text")
    assert len(table) == 10 and list(table[["layer", "feature"]].iloc[6]) == [1, 1]
    row = table.iloc[6]
    k0, n0 = n_fire[1, 0, 0, 1], n_tokens[1, 0, 0]
    k1, n1 = n_fire[1, 1, 0, 1], n_tokens[1, 1, 0]
    assert row["c_f"] == pytest.approx(cosine.values[1, 1])
    assert row["E_v"] == pytest.approx(sum_sq[1, 0, 0, 1] / n0)
    assert row["E_v_image"] == pytest.approx(sum_sq[1, 0, 1, 1] / n_tokens[1, 0, 1])
    assert row["delta_p_spatial"] == pytest.approx(k1 / n1 - k0 / n0)
    a, b, c, d = k1 + 0.5, n1 - k1 + 0.5, k0 + 0.5, n0 - k0 + 0.5
    assert row["or_spatial"] == pytest.approx(a * d / (b * c))
    se = np.sqrt(1 / a + 1 / b + 1 / c + 1 / d)
    assert row["or_spatial_low"] == pytest.approx(
        a * d / (b * c) * np.exp(-1.959964 * se), rel=1e-5
    )
    full = feature_statistics(stats_dataset(n_fire, n_tokens, sum_sq), cosine, tokens="full")
    assert full.iloc[6]["p_ocr"] == pytest.approx(n_fire[1, 2, :, 1].sum() / n_tokens[1, 2].sum())


def test_odds_ratio_and_delta_p_edge_cases():
    # never firing, always firing, firing only in the contrast, only in the base
    n1, n0 = 100, 1000
    k1 = np.array([0, n1, 10, 0])
    k0 = np.array([0, n0, 0, 50])
    ratio, low, high = odds_ratio(k1, n1, k0, n0)
    assert ratio[0] == 1 and ratio[1] == 1  # no information, whatever the split sizes
    assert low[0] == 0 and high[0] == np.inf and low[1] == 0 and high[1] == np.inf
    assert np.isfinite(ratio[2:]).all() and ratio[2] > 1 > ratio[3]
    assert low[2] > 1  # 10/100 against 0/1000 is significant
    assert ratio[2] == pytest.approx((10.5 / 90.5) / (0.5 / 1000.5))

    n_fire = np.zeros((1, 3, 2, 4), np.int64)
    n_tokens = np.array([[[n0, 0], [n1, 0], [n1, 0]]])
    n_fire[0, :, 0, 1] = [n0, n1, n1]  # feature 1 fires on every token; feature 0 never
    n_fire[0, :, 0, 2] = [5, 10, 0]  # recruited by the spatial split
    table = feature_statistics(stats_dataset(n_fire, n_tokens, np.zeros(n_fire.shape)), None)
    assert table["c_f"].isna().all()
    assert list(table["delta_p_spatial"].iloc[:2]) == [0, 0]
    assert list(table["or_spatial"].iloc[:2]) == [1, 1]
    assert table["E_v_image"].isna().all()  # no image tokens: undefined, not zero
    mask = candidate_mask(
        table, "spatial", {"min_delta_p": 0, "min_odds_ratio": 1, "require_significant": True}
    )
    assert mask.tolist() == [False, False, True, False]


def test_percentile_is_global_over_layers():
    # layer 0 rotated much more than layer 1: a per-layer percentile would take half of each
    cos = np.concatenate([np.linspace(0.1, 0.4, 50), np.linspace(0.6, 0.9, 50)])
    table = pd.DataFrame(
        {
            "layer": np.repeat([0, 1], 50),
            "feature": np.tile(np.arange(50), 2),
            "c_f": cos,
            "E_v": 1.0,
        }
    )
    picked = adapted_mask(table, p_cos=50, eps=1e-3)
    assert picked[:50].all() and not picked[50:].any()
    assert adapted_mask(table, p_cos=25, eps=1e-3).sum() == 25
    table.loc[3, "E_v"] = 0.0  # no visual energy: out, however rotated
    table.loc[4, "E_v"] = 1e-3  # E_v > eps is strict
    assert not adapted_mask(table, 50, 1e-3)[[3, 4]].any()
    distinct = np.random.default_rng(0).permutation(1000) / 1000
    assert (distinct <= cosine_threshold(distinct, 25)).sum() == 250
    assert np.isnan(cosine_threshold(np.full(3, np.nan), 25))


# ----------------------------------------------------------------------------- selection


def feature_table(n: int = 40, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    table = pd.DataFrame(
        {
            "layer": np.arange(n) % 2,
            "feature": np.arange(n) // 2,
            "c_f": rng.uniform(0, 1, n),
            "E_v": rng.uniform(0, 0.01, n),
            "p_val": rng.uniform(0, 0.1, n),
        }
    )
    for c in ("spatial", "ocr"):
        table[f"p_{c}"] = table["p_val"] + rng.uniform(-0.02, 0.05, n)
        table[f"delta_p_{c}"] = table[f"p_{c}"] - table["p_val"]
        table[f"or_{c}"] = np.exp(rng.normal(0.3, 0.5, n))
        table[f"or_{c}_low"] = table[f"or_{c}"] / 2
    return table


def verdicts(table: pd.DataFrame, contrast: str, cfg: dict, passed) -> pd.DataFrame:
    cands = table[candidate_mask(table, contrast, cfg)][["layer", "feature"]]
    return cands.assign(pass_rate=0.7, passed=passed(len(cands)))


CFG = {"min_delta_p": 0.0, "min_odds_ratio": 1.0, "require_significant": False}


def test_select_features_sets_and_subset():
    table = feature_table()
    lexical = {
        c: verdicts(table, c, CFG, lambda n: np.arange(n) % 2 == 0) for c in ("spatial", "ocr")
    }
    out = select_features(
        table,
        lexical,
        p_cos=50,
        eps=0.002,
        n_selected=2,
        contrasts={"spatial": CFG, "ocr": CFG},
        log=lambda m: None,
    )
    for c in ("spatial", "ocr"):
        expected = out[f"{c}_candidate"] & out[f"{c}_lexical_pass"] & out["adapted"]
        assert (out[f"{c}_set"] == expected).all() and expected.any()
        assert out.loc[~out[f"{c}_candidate"], f"{c}_lexical_pass_rate"].isna().all()
        chosen = out[out[f"{c}_selected"]]
        assert len(chosen) == min(2, int(expected.sum()))
        assert chosen[f"or_{c}"].min() >= out.loc[expected & ~out[f"{c}_selected"], f"or_{c}"].max()
    subset = selected_table(out, ["spatial", "ocr"])
    assert list(subset["contrast"].unique()) == ["spatial", "ocr"] and (subset["rank"] <= 2).all()


def test_empty_sets_are_reported_and_drawn(tmp_path):
    from vlmdiff.plots import (
        fig2_feature_selection,
        fig9_firing_frequency,
        fig10_ocr_features,
        save,
    )

    table = feature_table()
    strict = {"min_delta_p": 1.0, "min_odds_ratio": 1e9, "require_significant": True}
    lexical = {
        c: verdicts(table, c, strict, lambda n: np.ones(n, bool)) for c in ("spatial", "ocr")
    }
    out = select_features(
        table,
        lexical,
        p_cos=25,
        eps=1e-3,
        n_selected=5,
        contrasts={"spatial": strict, "ocr": strict},
        log=lambda m: None,
    )
    assert not out["spatial_set"].any()
    summary = set_summary(out, ["spatial", "ocr"]).set_index("set")
    assert summary.loc["spatial set", "n_features"] == 0
    assert summary.loc["spatial set", "note"].startswith("EMPTY")
    assert summary.loc["adapted", "note"] == ""
    subset = selected_table(out, ["spatial", "ocr"])
    assert subset.empty and {"contrast", "layer", "feature", "odds_ratio"} <= set(subset.columns)
    save(fig2_feature_selection(out, 1e-3, 25), tmp_path / "fig2.png")
    save(fig9_firing_frequency(out), tmp_path / "fig9.png")
    save(fig10_ocr_features(out, 1e-3, strict), tmp_path / "fig10.png")
    assert (tmp_path / "fig2.pdf").stat().st_size > 1000 and not list(tmp_path.glob(".*"))


def test_threshold_sweep():
    table = feature_table(200)
    sweep = threshold_sweep(table, [10, 50, 90], [0, 0.005], p_cos=25, eps=0.001)
    assert len(sweep) == 4 * 3  # the operating point (25, 0.001) is added to both axes
    op = sweep[sweep["operating_point"]].iloc[0]
    assert op["jaccard"] == 1 and op["layer_count_corr"] == pytest.approx(1)
    assert op["n_selected"] == adapted_mask(table, 25, 0.001).sum()
    counts = sweep[sweep["eps"] == 0].sort_values("p_cos")["n_selected"]
    assert counts.is_monotonic_increasing


def test_ground_truth_precision():
    meta = pd.DataFrame(
        {
            "family": ["spatial"] * 6 + ["colour"] * 4,
            "relation": ["left of"] * 4 + ["above"] * 2 + [""] * 4,
        }
    )
    table = pd.DataFrame(
        {
            "layer": [0, 0, 0, 1],
            "feature": [0, 1, 2, 3],
            "adapted": [True, True, True, True],
            "spatial_set": [True, False, False, False],
            "spatial_candidate": [True, True, False, False],
        }
    )
    samples = {
        (0, 0): np.array([0, 1, 2, 6]),
        (0, 1): np.array([7, 8]),
        (0, 2): np.array([9]),
        (1, 3): np.array([], int),
    }
    per_feature, summary = ground_truth(table, samples, meta, ["spatial"], n_random=10, seed=0)
    row = per_feature[per_feature["group"] == "spatial set"].iloc[0]
    assert row["precision"] == 0.75 and row["dominant_relation"] == "left of"
    random = per_feature[per_feature["group"].str.startswith("random")]
    assert set(random["feature"]) == {1, 2, 3}  # adapted, outside the set
    s = summary.set_index("group")
    assert (
        s.loc["spatial set", "mean_precision"] == 0.75 and s.loc["spatial set", "base_rate"] == 0.6
    )
    assert s.loc["random adapted (for spatial)", "mean_precision"] == 0  # feature 3: no samples


# ----------------------------------------------------------------------------- lexical filter

QUESTION = "is the red circle left of the blue square ?"
NEUTRAL = "describe the image ."


@pytest.fixture(scope="module")
def word_and_image_model(tiny_config):
    """A VLM whose layer-0 output is, at a text token, the token's embedding (orthonormal, one
    dimension left free) plus, in the free dimension, the mean over earlier tokens of a signal
    that only image tokens carry. An SAE reads feature 0 off the embedding of "left" and
    feature 1 off the free dimension: the first fires on a word, the second on the image."""
    from vlmdiff.models.build import build_lm, build_vlm, make_processor
    from vlmdiff.models.tokenizer import build_tokenizer

    tok = build_tokenizer([QUESTION, NEUTRAL])
    lm = build_lm(tok, tiny_config["lm"], seed=0)
    size = tiny_config["world"]["scene"]["image_size"]
    model = build_vlm(lm, tok, tiny_config["vision"], size, seed=0).eval()
    proc = make_processor(tok, size, tiny_config["vision"]["patch_size"])
    d = model.config.text_config.hidden_size
    free = d - 1
    inner = model.model.language_model
    with torch.no_grad():
        vocab = inner.embed_tokens.weight.shape[0]
        assert vocab < free
        basis, _ = torch.linalg.qr(
            torch.randn(free, free, generator=torch.Generator().manual_seed(0))
        )
        inner.embed_tokens.weight.zero_()
        inner.embed_tokens.weight[:, :free] = basis[:vocab]
        block = inner.layers[0]
        attn = block.self_attn
        for w in (
            attn.q_proj.weight,
            attn.k_proj.weight,
            attn.v_proj.weight,
            attn.o_proj.weight,
            block.mlp.down_proj.weight,
        ):
            w.zero_()  # q = k = 0: uniform attention over earlier tokens; no MLP
        attn.v_proj.weight[0, free] = 1.0
        attn.o_proj.weight[free, 0] = 1.0
        projector = model.model.multi_modal_projector.linear_2
        projector.weight.zero_()
        projector.bias.zero_()
        projector.bias[free] = 5.0  # every image token: 5 e_free

        sae = TopKSAE(d, 2, k=2)
        left = inner.embed_tokens.weight[tok.convert_tokens_to_ids("left")]
        sae.W_enc[0] = left / left.norm() ** 2
        sae.W_enc[1, free] = 1.0
        sae.b_enc.copy_(torch.tensor([-0.5, -1.0]))
        sae.W_dec.copy_(torch.nn.functional.normalize(torch.randn(d, 2), dim=0))
    rng = np.random.default_rng(0)
    images = [
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)) for _ in range(3)
    ]
    ds = Dataset.from_dict({"question": [QUESTION] * 3, "image": images})
    return model, proc, sae, ds


def test_lexical_filter_keeps_the_image_feature_and_drops_the_word_feature(word_and_image_model):
    from vlmdiff.features.lexical import lexical_filter, sample_maxima

    model, proc, sae, ds = word_and_image_model
    best = sample_maxima(
        model, proc, ds, {0: [0, 1]}, {0: sae}, batch_size=2, device=torch.device("cpu")
    )[0]
    assert (best > 0).all()  # with the question, both fire on every sample
    samples = {(0, 0): np.array([0, 1, 2]), (0, 1): np.array([2, 0])}
    table = lexical_filter(
        model,
        proc,
        ds,
        samples,
        {0: sae},
        [NEUTRAL, QUESTION],
        min_fraction=0.6,
        batch_size=2,
        device=torch.device("cpu"),
        log=lambda m: None,
    ).set_index("feature")
    assert table.loc[0, "original_rate"] == 1 and table.loc[1, "original_rate"] == 1
    assert table.loc[0, "pass_rate"] == 0.5  # fires only where the prompt still says "left"
    assert not table.loc[0, "passed"]
    assert table.loc[1, "pass_rate"] == 1 and table.loc[1, "passed"]
    assert list(table["n_samples"]) == [3, 2] and (table["n_prompts"] == 2).all()


def test_unknown_words_are_found(word_and_image_model):
    from vlmdiff.features.lexical import unknown_words

    _, proc, _, _ = word_and_image_model
    assert unknown_words(proc.tokenizer, [NEUTRAL, "describe the layout ."]) == {
        "describe the layout .": ["layout"]
    }
