"""A feature's activations over D_base, sample by sample: the histogram and firing density its
page shows, examples drawn across activation quantiles, and hard negatives.

Every number here is a sample's maximum activation over its prompt tokens (as the statistics
pass ranks top samples), one per D_base row. Hard negatives follow delphi's idea of negatives
that look like positives: D_base samples that share the words the feature fires on in its
described examples, yet where it stays below the negatives' ceiling; the more of those words a
sample shares the harder it is, and among equals the nearer miss (higher activation) is harder.
Where too few samples share a word, the nearest misses fill the rest; where too few stay below
the ceiling at all, the quietest of the others.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Collection, Sequence
from typing import Any

import numpy as np

from vlmdiff.interp.scoring import quantile_sample

_WORD = re.compile(r"[a-z0-9]+")


def activation_histogram(maxima: np.ndarray, bins: int) -> dict[str, Any]:
    """Histogram of the firing samples' maxima (`bins` equal bins from 0 to the top one) and
    the firing density (share of samples where the feature fires at all)."""
    values = np.asarray(maxima, float)
    firing = values[values > 0]
    top = float(firing.max()) if len(firing) else 1.0
    counts, edges = np.histogram(firing, bins=bins, range=(0.0, top))
    return {"edges": [round(float(e), 6) for e in edges], "counts": counts.tolist(),
            "n_samples": len(values), "n_firing": len(firing),
            "density": len(firing) / len(values) if len(values) else 0.0}


def quantile_rows(maxima: np.ndarray, n_bins: int, per_bin: int, rng: np.random.Generator
                  ) -> list[tuple[int, int]]:
    """`(row, bin)` of up to `per_bin` samples from each of `n_bins` equal slices of the firing
    samples ranked by activation (bin 0 the strongest), strongest first within a bin."""
    values = np.asarray(maxima, float)
    firing = np.flatnonzero(values > 0)
    bins = min(n_bins, len(firing))
    if bins == 0 or per_bin <= 0:
        return []
    picked = quantile_sample(values[firing].tolist(), bins, bins * per_bin, rng)
    return [(int(firing[i]), q) for i, q in picked]


def normalise(token: str) -> str:
    """A token as a word: BPE space marks stripped, lower case."""
    return token.lstrip("\u0120\u2581").strip().lower()


def text_words(text: str) -> set[str]:
    """The lower-case words of a text."""
    return set(_WORD.findall(text.lower()))


def top_words(tokens: Sequence[Sequence[str]], acts: Sequence[Sequence[float]], n: int,
              per_sample: int = 2) -> list[str]:
    """Up to `n` words the feature fires on most across samples: each sample's `per_sample`
    most active word-like tokens (chat-template tokens such as `<|user|>` left out), the most
    frequent first."""
    counts: Counter[str] = Counter()
    for toks, a in zip(tokens, acts, strict=True):
        order = np.argsort(-np.asarray(a, float), kind="stable")
        words = [normalise(toks[i]) for i in order if a[i] > 0 and not toks[i].startswith("<")]
        words = [w for w in words if _WORD.fullmatch(w)]
        counts.update(dict.fromkeys(words[:per_sample], 1))
    return [w for w, _ in counts.most_common(n)]


def hard_negative_rows(texts: Sequence[str], maxima: np.ndarray, words: Collection[str],
                       ceiling: float, exclude: Collection[int], n: int) -> list[int]:
    """`n` rows (not in `exclude`) whose maximum stays at or below `ceiling`: those sharing
    the most of `words` first, then the nearest misses. Where too few stay below it (a
    feature that fires on nearly everything), the quietest of the rest follow, those sharing
    the most words first, as the random negatives fall back to the quietest drawn."""
    values = np.asarray(maxima, float)
    wanted, skip = set(words), set(exclude)
    rows = [r for r in range(len(texts)) if r not in skip]
    shared = {r: len(wanted & text_words(texts[r])) for r in rows}
    quiet = sorted((r for r in rows if values[r] <= ceiling),
                   key=lambda r: (-shared[r], -values[r], r))
    loud = sorted((r for r in rows if values[r] > ceiling),
                  key=lambda r: (-shared[r], values[r], r))
    return (quiet + loud)[:max(0, n)]


def word_marks(tokens: Sequence[str], words: Collection[str]) -> list[float]:
    """1.0 on each token that is one of `words`, else 0.0 (where a hard negative's marks go
    when it is fuzzed: on the words that make it look like a positive)."""
    wanted = set(words)
    return [1.0 if normalise(t) in wanted else 0.0 for t in tokens]
