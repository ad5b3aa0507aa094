"""Detection and fuzzing scores as delphi defines them (Paulo et al. 2024, "Automatically
Interpreting Millions of Features in LLMs"), with intervals.

- **Held-out positives across quantiles.** A feature's activating samples, ranked by
  activation, are cut into `n_quantiles` equal slices; `n // n_quantiles` are drawn from each
  (all of a slice that is shorter), so the score sees weak activations as well as the top ones.
- **Detection.** The scorer reads a description and whole samples, positives (label 1) mixed
  with negatives (label 0: random samples where the feature stays low, or hard ones, e.g.
  where a related feature fires), and says for each whether the feature fires on it.
- **Fuzzing.** The scorer reads samples with some tokens marked `<<...>>` and says whether the
  marked tokens are what the description is about. Positives are marked where the feature is
  active (label 1); random negatives are marked at the spans of a random positive (label 0), and
  hard negatives (samples where another feature fires) where that feature is active.
- **Score.** Class-balanced accuracy `(TPR + TNR) / 2`, delphi's headline number (chance is
  0.5 whatever the class mix), beside precision, recall and F1.
- **Intervals.** Per feature, a percentile bootstrap over its samples, resampled within each
  class; over features, a percentile bootstrap of the mean; RAW vs OVERLAY, a paired bootstrap
  of the mean difference over the features both variants scored.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

MARK_OPEN, MARK_CLOSE = "<<", ">>"


def quantile_sample(activations: Sequence[float], n_quantiles: int, n: int,
                    rng: np.random.Generator) -> list[tuple[int, int]]:
    """`(index, quantile)` of the samples drawn: quantile 0 holds the strongest activations."""
    if n_quantiles < 1 or n < 0:
        raise ValueError(f"n_quantiles must be >= 1 and n >= 0, got {n_quantiles} and {n}")
    order = np.argsort(-np.asarray(activations, float), kind="stable")
    size, per = len(order) // n_quantiles, n // n_quantiles
    picked: list[tuple[int, int]] = []
    for q in range(n_quantiles):
        part = order[q * size:(q + 1) * size]
        if len(part) > per:  # keep the slice's rank order among those drawn
            part = part[np.sort(rng.choice(len(part), size=per, replace=False))]
        picked += [(int(i), q) for i in part]
    return picked


def active_spans(token_acts: Sequence[float]) -> list[tuple[int, int]]:
    """`[start, end)` of each run of consecutive tokens with a positive activation."""
    spans, start = [], None
    for i, a in enumerate(token_acts):
        if a > 0 and start is None:
            start = i
        elif a <= 0 and start is not None:
            spans.append((start, i))
            start = None
    if start is not None:
        spans.append((start, len(token_acts)))
    return spans


def highlight(tokens: Sequence[str], spans: Sequence[tuple[int, int]]) -> str:
    """The tokens joined by spaces, each span wrapped in `<<` `>>` (spans past the end are
    clipped, empty ones dropped)."""
    opens, closes = {}, {}
    for start, end in spans:
        start, end = max(0, start), min(len(tokens), end)
        if start < end:
            opens[start] = True
            closes[end - 1] = True
    words = [(MARK_OPEN if i in opens else "") + t + (MARK_CLOSE if i in closes else "")
             for i, t in enumerate(tokens)]
    return " ".join(words)


@dataclass(frozen=True)
class Item:
    """One sample as a scorer sees it, and the answer that is right."""

    text: str
    label: int


def detection_items(positives: Sequence[Sequence[str]], negatives: Sequence[Sequence[str]]
                    ) -> list[Item]:
    """Whole samples, unmarked: positives first, then negatives (shuffle before asking)."""
    return ([Item(" ".join(t), 1) for t in positives]
            + [Item(" ".join(t), 0) for t in negatives])


def fuzzing_items(positives: Sequence[tuple[Sequence[str], Sequence[float]]],
                  negatives: Sequence[Sequence[str]], rng: np.random.Generator, *,
                  hard: Sequence[tuple[Sequence[str], Sequence[float]]] = ()) -> list[Item]:
    """Marked samples: positives `(tokens, token activations)` at their active spans (1);
    random negatives (tokens) at a random positive's spans (0); hard negatives `(tokens,
    activations of the feature that makes them hard)` at those active spans (0)."""
    pos_spans = [active_spans(a) for _, a in positives]
    items = [Item(highlight(t, s), 1) for (t, _), s in zip(positives, pos_spans, strict=True)]
    for tokens in negatives:
        spans = pos_spans[int(rng.integers(len(pos_spans)))] if pos_spans else []
        items.append(Item(highlight(tokens, spans), 0))
    items += [Item(highlight(t, active_spans(a)), 0) for t, a in hard]
    return items


def classification_scores(labels: Sequence[int], predictions: Sequence[int]
                          ) -> dict[str, float | int]:
    """Counts, balanced accuracy, precision, recall and F1 of 0/1 predictions (rates of an
    empty class count as 0, as delphi does)."""
    y, p = np.asarray(labels, int), np.asarray(predictions, int)
    if y.shape != p.shape:
        raise ValueError(f"{len(y)} labels but {len(p)} predictions")
    tp, tn = int(((y == 1) & (p == 1)).sum()), int(((y == 0) & (p == 0)).sum())
    fp, fn = int(((y == 0) & (p == 1)).sum()), int(((y == 1) & (p == 0)).sum())
    tpr = tp / (tp + fn) if tp + fn else 0.0
    tnr = tn / (tn + fp) if tn + fp else 0.0
    precision = tp / (tp + fp) if tp + fp else 0.0
    f1 = 2 * precision * tpr / (precision + tpr) if precision + tpr else 0.0
    return {"tp": tp, "fp": fp, "fn": fn, "tn": tn, "balanced_accuracy": (tpr + tnr) / 2,
            "precision": precision, "recall": tpr, "f1": f1}


def balanced_accuracy_interval(labels: Sequence[int], predictions: Sequence[int], *,
                               level: float = 0.95, n_boot: int = 2000, seed: int = 0
                               ) -> tuple[float, float]:
    """Percentile bootstrap of one feature's balanced accuracy, resampling within each class."""
    y, p = np.asarray(labels, int), np.asarray(predictions, int)
    rng = np.random.default_rng(seed)
    rates = []
    for cls in (1, 0):
        hits = (p[y == cls] == cls).astype(float)
        if len(hits) == 0:
            rates.append(np.zeros(n_boot))
            continue
        draws = rng.integers(0, len(hits), size=(n_boot, len(hits)))
        rates.append(hits[draws].mean(axis=1))
    return _percentiles((rates[0] + rates[1]) / 2, level)


@dataclass(frozen=True)
class Estimate:
    """A mean with its interval over `n` features."""

    mean: float | None
    low: float | None
    high: float | None
    n: int

    def text(self) -> str:
        if self.mean is None:
            return "–"
        return f"{self.mean:.2f} [{self.low:.2f}, {self.high:.2f}]"


def mean_interval(values: Sequence[float], *, level: float = 0.95, n_boot: int = 2000,
                  seed: int = 0) -> Estimate:
    """The mean over features and its percentile bootstrap interval (NaNs dropped)."""
    v = np.asarray(values, float)
    v = v[~np.isnan(v)]
    if len(v) == 0:
        return Estimate(None, None, None, 0)
    draws = np.random.default_rng(seed).integers(0, len(v), size=(n_boot, len(v)))
    low, high = _percentiles(v[draws].mean(axis=1), level)
    return Estimate(float(v.mean()), low, high, len(v))


def paired_difference(a: Sequence[float], b: Sequence[float], *, level: float = 0.95,
                      n_boot: int = 2000, seed: int = 0) -> Estimate:
    """Mean of `b - a` over the features both scored, with a paired bootstrap interval."""
    x, y = np.asarray(a, float), np.asarray(b, float)
    if x.shape != y.shape:
        raise ValueError(f"{len(x)} and {len(y)} scores: pair them by feature first")
    keep = ~(np.isnan(x) | np.isnan(y))
    return mean_interval((y - x)[keep], level=level, n_boot=n_boot, seed=seed)


def _percentiles(draws: np.ndarray, level: float) -> tuple[float, float]:
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(draws, [tail, 100 - tail])
    return float(low), float(high)
