"""Delphi's detection and fuzzing definitions on hand-made cases."""

import numpy as np
import pytest
from vlmdiff.interp.scoring import (
    Item,
    active_spans,
    balanced_accuracy_interval,
    classification_scores,
    detection_items,
    fuzzing_items,
    highlight,
    mean_interval,
    paired_difference,
    quantile_sample,
)


def test_quantile_sample_draws_evenly_from_every_slice():
    acts = [float(a) for a in range(100)]  # sample i activates at i: rank r is sample 99 - r
    picked = quantile_sample(acts, n_quantiles=10, n=20, rng=np.random.default_rng(0))
    assert len(picked) == 20
    for q in range(10):
        rows = [i for i, qq in picked if qq == q]
        assert len(rows) == 2
        # slice q holds ranks 10q..10q+9, the samples 90-10q..99-10q
        assert all(90 - 10 * q <= i <= 99 - 10 * q for i in rows)
        assert rows == sorted(rows, reverse=True)  # strongest first within a slice
    # a slice shorter than its share gives all it has; leftovers past n_quantiles * size are
    # never drawn, as in delphi
    few = quantile_sample([3.0, 2.0, 1.0, 0.5, 0.2], n_quantiles=2, n=10,
                          rng=np.random.default_rng(0))
    assert few == [(0, 0), (1, 0), (2, 1), (3, 1)]
    with pytest.raises(ValueError, match="n_quantiles"):
        quantile_sample(acts, 0, 5, np.random.default_rng(0))


def test_highlight_marks_runs_of_active_tokens():
    tokens = ["is", "the", "red", "cube", "left", "of", "it"]
    acts = [0, 0, 0.5, 1.2, 0, 2.0, 0]
    assert active_spans(acts) == [(2, 4), (5, 6)]
    assert highlight(tokens, active_spans(acts)) == "is the <<red cube>> left <<of>> it"
    assert active_spans([1.0, 1.0]) == [(0, 2)]
    # spans from another sample are clipped to this one's length
    assert highlight(["a", "b"], [(1, 5), (3, 4)]) == "a <<b>>"


def test_fuzzing_marks_negatives_where_a_positive_fired():
    pos = [(["left", "of", "the", "cube"], [1.0, 0.4, 0, 0])]
    quiet = ["what", "colour", "is", "it"]
    hard = (["a", "red", "ball"], [0, 0.3, 0])  # where another feature fires, on "red"
    items = fuzzing_items(pos, [quiet], np.random.default_rng(0), hard=[hard])
    assert items == [Item("<<left of>> the cube", 1), Item("<<what colour>> is it", 0),
                     Item("a <<red>> ball", 0)]
    # with two positives, each negative borrows the spans of one of them
    two = [(["a", "b", "c"], [1, 0, 0]), (["a", "b", "c"], [0, 0, 1])]
    marks = {fuzzing_items(two, [["x", "y", "z"]], np.random.default_rng(s))[-1].text
             for s in range(20)}
    assert marks == {"<<x>> y z", "x y <<z>>"}
    assert detection_items([["left", "of"]], [["red", "ball"]]) == [
        Item("left of", 1), Item("red ball", 0)]


def test_balanced_accuracy_is_chance_for_a_constant_answer():
    # 20 positives, 5 negatives: answering 1 always has F1 0.89 but balanced accuracy 0.5
    labels = [1] * 20 + [0] * 5
    s = classification_scores(labels, [1] * 25)
    assert s["balanced_accuracy"] == 0.5 and s["f1"] == pytest.approx(40 / 45)
    s = classification_scores([1, 1, 1, 1, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0, 1, 1])
    assert (s["tp"], s["fn"], s["tn"], s["fp"]) == (3, 1, 2, 2)
    assert s["balanced_accuracy"] == pytest.approx((3 / 4 + 2 / 4) / 2)
    assert s["precision"] == pytest.approx(3 / 5) and s["recall"] == pytest.approx(3 / 4)
    with pytest.raises(ValueError, match="3 labels but 2"):
        classification_scores([1, 0, 1], [1, 0])


def test_intervals_narrow_with_more_samples_and_cover_the_mean():
    labels = [1] * 4 + [0] * 4
    preds = [1, 1, 1, 0, 0, 0, 0, 1]
    lo8, hi8 = balanced_accuracy_interval(labels, preds)
    lo40, hi40 = balanced_accuracy_interval(labels * 5, preds * 5)
    assert lo8 <= 0.75 <= hi8 and lo40 <= 0.75 <= hi40
    assert hi40 - lo40 < hi8 - lo8
    perfect = balanced_accuracy_interval(labels, labels)
    assert perfect == (1.0, 1.0)

    est = mean_interval([0.5, 0.6, 0.7, float("nan")])
    assert est.n == 3 and est.mean == pytest.approx(0.6) and est.low < 0.6 < est.high
    assert est.text().startswith("0.60 [")
    assert mean_interval([]).text() == "–"


def test_paired_difference_sees_a_consistent_gain_that_unpaired_means_hide():
    rng = np.random.default_rng(1)
    raw = rng.uniform(0.3, 0.9, size=12)  # features differ a lot from each other
    overlay = raw + 0.05  # every feature gains the same small amount
    d = paired_difference(raw, overlay)
    assert d.mean == pytest.approx(0.05) and d.low == pytest.approx(0.05)
    a, b = mean_interval(raw), mean_interval(overlay)
    assert a.high > b.low  # the two means' intervals overlap
    with pytest.raises(ValueError, match="pair them by feature"):
        paired_difference([0.1, 0.2], [0.3])
    # features one variant could not score are left out of the pairing
    assert paired_difference([0.5, float("nan")], [0.7, 0.9]).n == 1
