import numpy as np
import pandas as pd
import pytest
import torch
from vlmdiff.causal import ablation as ab
from vlmdiff.causal import tables
from vlmdiff.hooks import replace_layer_output

from tests.test_attribution import make_vlm


def test_project_out_removes_exactly_v_at_span():
    torch.manual_seed(0)
    h = torch.randn(2, 5, 8)
    v = torch.randn(8)
    span = torch.tensor([[0, 1, 1, 0, 1], [1, 0, 0, 0, 1]], dtype=torch.bool)
    out = ab.project_out(v, span)(h)
    u = v / v.norm()
    assert torch.allclose(out[span] @ u, torch.zeros(int(span.sum())), atol=1e-6)
    assert torch.equal(out[~span], h[~span])  # untouched elsewhere
    removed = h[span] - out[span]
    assert torch.allclose(removed, (h[span] @ u)[:, None] * u, atol=1e-6)
    # orthogonal to everything: nothing changes
    h0 = h.clone()
    h0[..., 0] = 0
    e0 = torch.zeros(8)
    e0[0] = 3.0
    assert torch.equal(ab.project_out(e0, span)(h0), h0)
    steered = ab.add_direction(v, 2.0, span)(h)
    assert torch.allclose(steered[span] - h[span], 2.0 * u.expand(int(span.sum()), 8))
    assert torch.equal(steered[~span], h[~span])


def test_ablation_hook_in_the_model_touches_only_text_positions():
    model, _, _, inputs = make_vlm(2)
    image_id = model.config.image_token_id
    span = ab.edit_positions(inputs["input_ids"], inputs["attention_mask"], image_id, "text")
    assert not span[inputs["input_ids"] == image_id].any()
    assert span[(inputs["input_ids"] != image_id) & inputs["attention_mask"].bool()].all()
    seen = {}

    def grab(key):
        def fn(h):
            seen[key] = h.detach().clone()
            return h
        return fn

    v = torch.randn(32)
    with torch.no_grad():
        with replace_layer_output(model, 0, grab("clean")):
            clean = model(**inputs).logits
        with replace_layer_output(model, 0, ab.project_out(v, span)), \
                replace_layer_output(model, 0, grab("ablated")):
            ablated = model(**inputs).logits
    u = v / v.norm()
    assert torch.allclose(seen["ablated"][span] @ u, torch.zeros(int(span.sum())), atol=1e-5)
    assert torch.equal(seen["ablated"][~span], seen["clean"][~span])
    assert not torch.allclose(clean, ablated)


def test_orthogonal_direction_leaves_the_model_unchanged():
    model, _, _, inputs = make_vlm(2)
    image_id = model.config.image_token_id
    span = ab.edit_positions(inputs["input_ids"], inputs["attention_mask"], image_id, "prompt")
    layer0 = {}

    def grab(h):
        layer0["h"] = h
        return h

    with torch.no_grad(), replace_layer_output(model, 0, grab):
        clean = model(**inputs).logits
    # a direction orthogonal to every block-0 output at the span
    q, _ = torch.linalg.qr(layer0["h"][span].T)  # [32, n] orthonormal basis of those outputs
    v = torch.randn(32)
    v = v - q @ (q.T @ v)
    with torch.no_grad(), replace_layer_output(model, 0, ab.project_out(v, span)):
        same = model(**inputs).logits
    assert torch.allclose(clean, same, atol=1e-5)


def test_caption_questions_and_relation_subset():
    assert ab.caption_question("The red circle is to the left of the blue square.") == \
        "is the red circle to the left of the blue square?"
    assert ab.caption_question("The cat is on the mat.", "{caption} is this true?") == \
        "The cat is on the mat. is this true?"
    rel = np.array(["above", "below", "above", "left of", "above", "below"])
    chosen, rows = ab.relation_subset(rel, np.array([0, 2, 1]), 0.5)
    assert chosen == ["above"] and rows.tolist() == [0, 2, 4]
    chosen, rows = ab.relation_subset(rel, np.array([0, 1]), 0.4)
    assert sorted(chosen) == ["above", "below"] and rows.tolist() == [0, 1, 2, 4, 5]
    assert ab.relation_subset(rel, np.zeros(0, int), 0.5)[0] == []


def test_tables_rank_by_vsr_drop_and_say_when_empty(tmp_path):
    runs = pd.DataFrame([
        {"feature": f, "layer": 1, "feature_index": i, "seed": s, "vsr_relations": "above",
         "n_vsr": 10, "n_vqa": 20, "vsr_acc": 0.8, "vsr_acc_ablated": 0.7, "vsr_prob": 0.6,
         "vsr_prob_ablated": 0.5, "vqa_acc": 0.9, "vqa_acc_ablated": 0.9, "d_vsr_acc": d + s,
         "d_vsr_prob": -0.1, "d_vqa_acc": 0.0, "d_ctrl": 0.5, "d_ctrl_vqa": 0.0, "controls": "3",
         "vsr_or": 2.0}
        for f, i, d in (("L1F4", 4, -2.0), ("L1F5", 5, -10.0)) for s in (0, 1)
    ], columns=tables.RUN_COLUMNS)
    summary = tables.summarise(runs)
    assert summary["feature"].tolist() == ["L1F5", "L1F4"]
    assert summary.loc[0, "d_vsr_acc_mean"] == -9.5
    assert summary.loc[0, "d_vsr_acc_std"] == np.std([-10, -9], ddof=1)
    out = {"runs": tmp_path / "runs.csv"}
    out.update({f"table{i}_{e}": tmp_path / f"t{i}.{e}" for i in (1, 2) for e in ("csv", "md", "tex")})
    tables.write_ablation_tables(runs, out, "spatial")
    assert "-9.50 ± 0.71" in (tmp_path / "t1.md").read_text()
    assert r"\pm" in (tmp_path / "t2.tex").read_text()
    tables.write_ablation_tables(runs.iloc[:0], out, "spatial")
    assert "EMPTY" in (tmp_path / "t1.md").read_text()
    assert "EMPTY" in (tmp_path / "t2.tex").read_text()
    assert len(pd.read_csv(tmp_path / "t1.csv")) == 0


def test_eval_setup_builds_the_shared_settings_from_plain_mappings():
    inputs = {"vlm": "m", "vsr": "v.parquet", "val": "val.parquet", "selected": "s.parquet",
              "features": "f.parquet", "saes": ["sae0", "sae1"], "acts": "a.nc"}
    params = {"layers": [0, 1], "contrast": "spatial", "max_features": 2, "template": "{question}",
              "device": "cpu", "ablation": {"top_vsr": 8, "min_relation_share": 0.25,
                                            "positions": "text", "batch_size": 4}}
    files, settings = ab.eval_setup(inputs, params)
    assert files.sae_dirs == {0: "sae0", 1: "sae1"} and files.vsr_acts_path == "a.nc"
    assert (settings.top_vsr, settings.positions, settings.device) == (8, "text", "cpu")
    with pytest.raises(ValueError):  # a layer without its SAE folder
        ab.eval_setup({**inputs, "saes": ["sae0"]}, params)
