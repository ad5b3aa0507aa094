"""A feature's activations over D_base: histogram, quantile examples, hard negatives."""

import numpy as np
import pandas as pd
import pytest
from vlmdiff.interp.distribution import (
    activation_histogram,
    hard_negative_rows,
    quantile_rows,
    top_words,
    word_marks,
)
from vlmdiff.interp.evidence import page_features


def test_histogram_counts_firing_samples_and_density():
    maxima = np.array([0.0, 0.0, 1.0, 2.0, 4.0, 0.0, 3.9, 0.0])
    h = activation_histogram(maxima, bins=4)
    assert h["edges"] == [0.0, 1.0, 2.0, 3.0, 4.0]
    assert h["counts"] == [0, 1, 1, 2]  # 1.0 opens bin 1; 4.0 closes the last bin
    assert (h["n_samples"], h["n_firing"]) == (8, 4)
    assert h["density"] == pytest.approx(0.5)


def test_histogram_of_a_silent_feature():
    h = activation_histogram(np.zeros(5), bins=3)
    assert sum(h["counts"]) == 0 and h["density"] == 0.0 and h["n_samples"] == 5


def test_quantile_rows_cover_every_bin_and_skip_silent_rows():
    maxima = np.zeros(100)
    maxima[1::2] = np.arange(50, 0, -1)  # 50 firing rows, strongest at row 1
    rows = quantile_rows(maxima, n_bins=5, per_bin=2, rng=np.random.default_rng(0))
    assert len(rows) == 10
    assert [b for _, b in rows] == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    values = [maxima[r] for r, _ in rows]
    assert all(v > 0 for v in values)
    assert min(values[:2]) > max(values[2:4])  # bin 0 holds the strongest
    assert max(values[-2:]) <= 10  # the last bin the weakest tenth
    assert quantile_rows(np.zeros(4), 3, 2, np.random.default_rng(0)) == []
    assert len(quantile_rows(np.array([0.0, 1.0, 2.0]), 4, 1, np.random.default_rng(0))) == 2


def test_top_words_counts_each_sample_once_and_skips_chat_tokens():
    tokens = [["<|user|>", "\u0120Left", "\u0120of", "?"], ["\u0120left", "\u0120red"],
              ["\u0120red", "\u0120square"]]
    acts = [[9.0, 2.0, 1.0, 0.5], [3.0, 1.0], [2.0, 0.0]]
    assert top_words(tokens, acts, n=3) == ["left", "red", "of"]


def test_hard_negatives_share_words_stay_quiet_and_miss_nearest_first():
    texts = ["is the red square left of the circle", "what colour is it",
             "is the circle left of it", "how many red things are left", "left red", "left"]
    maxima = np.array([0.05, 0.0, 0.09, 0.02, 5.0, 0.01])
    rows = hard_negative_rows(texts, maxima, {"left", "red"}, ceiling=0.1, exclude={0}, n=4)
    # row 4 fires (above the ceiling); row 0 is excluded; two shared words beat one
    assert rows == [3, 2, 5, 1]
    assert hard_negative_rows(texts, maxima, {"left"}, 0.1, set(), n=0) == []
    # too few quiet ones: the rest by shared words, then the quietest
    loud = np.array([0.5, 0.2, 0.09, 0.3, 5.0, 0.4])
    assert hard_negative_rows(texts, loud, {"left", "red"}, 0.1, {0}, n=4) == [2, 3, 4, 5]


def test_word_marks_fall_on_the_shared_words():
    assert word_marks(["Is", "\u0120Left", "of", "left"], {"left"}) == [0.0, 1.0, 0.0, 1.0]


def test_page_features_are_the_described_then_every_set_member(tmp_path):
    table = pd.DataFrame({"layer": [0, 0, 1, 1, 2], "feature": [3, 4, 5, 6, 7],
                          "spatial_set": [True, True, False, True, False],
                          "spatial_rank": [2, 1, None, 3, None],
                          "ocr_set": [False, True, True, False, False],
                          "ocr_rank": [None, 2, 1, None, None]})
    table.to_parquet(tmp_path / "features.parquet")
    described = pd.DataFrame({"layer": [0], "feature": [4], "contrast": ["spatial"],
                              "rank": [1]})
    got = page_features(described, tmp_path / "features.parquet", ["spatial", "ocr"], True)
    assert list(zip(got["layer"], got["feature"], got["contrast"], got["rank"],
                    got["described"], strict=True)) == [(0, 4, "spatial", 1, True), (0, 3, "spatial", 2, False),
                                           (1, 6, "spatial", 3, False), (1, 5, "ocr", 1, False)]
    assert got["sets"].tolist() == [["spatial", "ocr"], ["spatial"], ["spatial"], ["ocr"]]
    only = page_features(described, tmp_path / "features.parquet", ["spatial"], False)
    assert only["feature"].tolist() == [4] and only["sets"].tolist() == [["spatial"]]


def test_page_features_of_empty_sets_is_an_empty_table(tmp_path):
    table = pd.DataFrame({"layer": [0, 1], "feature": [3, 4], "spatial_set": [False, False],
                          "spatial_rank": [None, None]})
    table.to_parquet(tmp_path / "features.parquet")
    none = pd.DataFrame(columns=["layer", "feature", "contrast", "rank"])
    got = page_features(none, tmp_path / "features.parquet", ["spatial"], True)
    assert got.empty and {"layer", "feature", "described", "sets"} <= set(got.columns)
