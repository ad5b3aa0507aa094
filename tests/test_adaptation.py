import numpy as np
import pandas as pd
import pytest
import torch
from vlmdiff.sae.adaptation import (
    decoder_cosine,
    decoder_cosines,
    final_table,
    loss_regime,
    regime_summary,
    train_config,
)
from vlmdiff.sae.topk import TopKSAE


def test_loss_regime():
    assert loss_regime("random") == "full"
    assert loss_regime("text") == "text"
    with pytest.raises(ValueError, match="unknown regime"):
        loss_regime("audio")


def test_decoder_cosine_identical_and_rotated():
    base = TopKSAE.from_random(16, 64, 4, seed=0)
    assert np.allclose(decoder_cosine(base, base), 1.0, atol=1e-6)
    other = TopKSAE.from_random(16, 64, 4, seed=1)
    cos = decoder_cosine(base, other)
    assert cos.shape == (64,) and abs(cos.mean()) < 0.15
    flipped = TopKSAE.from_random(16, 64, 4, seed=0)
    with torch.no_grad():
        flipped.W_dec[:, :8] *= -3.0  # direction reversed, norm irrelevant
    assert np.allclose(decoder_cosine(base, flipped)[:8], -1.0, atol=1e-6)
    with pytest.raises(ValueError, match="shapes differ"):
        decoder_cosine(base, TopKSAE.from_random(16, 32, 4, seed=0))


def test_decoder_cosines_array(tmp_path):
    base_dirs, adapted = {}, {}
    for layer in (0, 1):
        base = TopKSAE.from_random(8, 16, 2, seed=layer)
        base.save(tmp_path / f"base{layer}", {"layer": layer})
        base_dirs[layer] = tmp_path / f"base{layer}"
        for i, regime in enumerate(("text", "random")):
            sae = base if regime == "text" else TopKSAE.from_random(8, 16, 2, seed=10 + i)
            sae.save(tmp_path / f"{regime}{layer}", {"layer": layer})
            adapted[(regime, layer)] = tmp_path / f"{regime}{layer}"
    cos = decoder_cosines(base_dirs, adapted)
    assert cos.dims == ("regime", "layer", "feature") and cos.shape == (2, 2, 16)
    assert list(cos["regime"].values) == ["text", "random"]
    assert np.allclose(cos.sel(regime="text"), 1.0, atol=1e-6)


def test_tables():
    rows = []
    for layer in (0, 1):
        for regime, end in (("text", 0.1), ("image", 0.4)):
            for t, fvu in ((0, 0.5), (100, end)):
                rows.append({"layer": layer, "regime": regime, "tokens_seen": t, "fvu": fvu,
                             "l0": 4.0, "dead_fraction": 0.0, "fired_fraction": 1.0})
    hist = pd.DataFrame(rows)
    splice = pd.DataFrame({"layer": [0, 1, 0, 1], "regime": ["text", "text", "image", "image"],
                           "ce_clean": 1.0, "ce_spliced": 1.1, "ce_loss_recovered": 0.9, "kl": 0.01})
    table = final_table(hist, splice)
    assert len(table) == 4
    assert set(table["initial_fvu"]) == {0.5}
    assert table.set_index(["layer", "regime"]).loc[(1, "image"), "final_fvu"] == 0.4
    summary = regime_summary(table).set_index("regime")
    assert summary.loc["text", "mean"] == pytest.approx(0.1) and summary.loc["text", "best"]
    assert list(summary.index) == ["image", "text"]  # paper's regime order


def test_train_config_from_section():
    cfg = train_config({"lr": 1e-3, "max_tokens": 10, "layer_lr_decay": 0.9}, "sae.adapt",
                       k=4, seed=3, device="cpu")
    assert cfg.k == 4 and cfg.seed == 3 and cfg.lr == 1e-3 and cfg.layer_lr_decay == 0.9
