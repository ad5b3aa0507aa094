"""What auto-interpretation and the dashboards show of a feature (paper 5.1, App. B.1).

Per selected feature: its top-activating samples from VQA (D_base), VQA-spatial (D_sp) and
VSR, taken in turn from each source and de-duplicated (the spatial split repeats D_base
questions); the first `k` are the examples a language model describes, the next ones held-out
positives; random D_base samples where the feature stays low are the random negatives, and
quiet D_base samples sharing the words it fires on the hard ones (`interp.distribution`).
Each sample carries its picture, the activation of every prompt token, a textual stand-in for
the picture (for text-only models: the scene in words, which the shapes world knows), and,
where the feature has attribution scores, the attention of its top heads drawn over the
picture and summarised in words (which objects hold the most attention).

Every member of the spatial and OCR sets gets evidence for its page too (`described` false
for those outside the selection): its top examples, the histogram of its activations over
D_base with its firing density, examples from each activation quantile bin, its top logit
effects and its own activation drawn over each picture.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from vlmdiff.interp.scoring import quantile_sample

if TYPE_CHECKING:
    import torch
    from datasets import Dataset


SOURCES = ("VQA", "VQA-spatial", "VSR")
EVIDENCE_FILE = "evidence.json"


@dataclass
class Sample:
    """One sample shown for a feature; paths are relative to the evidence folder."""

    source: str
    row: int
    text: str
    activation: float
    label: int  # 1: a top-activating sample (example or held-out positive); 0: a negative
    image: str = ""
    scene: str = ""  # the picture in words, for text-only models ("" where unknown)
    tokens: list[str] = field(default_factory=list)
    token_acts: list[float] = field(default_factory=list)
    overlay: str | None = None
    overlay_text: str | None = None
    activation_overlay: str | None = None
    """The feature's own activation on the image tokens drawn over the picture (pages only)."""
    quantile: int = -1
    """The activation quantile bin of a quantile example (0: the strongest); -1 elsewhere."""


GROUPS = ("examples", "positives", "negatives", "hard_negatives", "quantile_examples")
PAGE_ONLY = ("logit_effects", "quantile_examples", "histogram", "described")
"""What the pages show but no language model is shown (kept out of the auto-interp cache key)."""


@dataclass
class FeatureEvidence:
    """A feature's examples (described), held-out positives and negatives (validation), and
    what its page shows beside them. A set member outside the described ones (`described`
    false) has examples and the page's parts only."""

    label: str
    layer: int
    feature: int
    contrast: str
    rank: int
    heads: list[str]
    examples: list[Sample]
    positives: list[Sample]
    negatives: list[Sample]
    logit_effects: dict[str, list[Any]] = field(default_factory=dict)
    """Tokens the decoder direction promotes and suppresses most (`interp.logit_effects`)."""
    hard_negatives: list[Sample] = field(default_factory=list)
    """Quiet D_base samples that share the words it fires on (`interp.distribution`)."""
    hard_words: list[str] = field(default_factory=list)
    """Those words; a hard negative's fuzzing marks go on them."""
    quantile_examples: list[Sample] = field(default_factory=list)
    """D_base samples from each activation quantile bin (`Sample.quantile`)."""
    histogram: dict[str, Any] = field(default_factory=dict)
    """`interp.distribution.activation_histogram` over D_base."""
    described: bool = True
    sets: list[str] = field(default_factory=list)
    """The contrasts' sets the feature belongs to."""

    def digest(self) -> str:
        """A hash of everything a language model is shown of this feature."""
        shown = {k: v for k, v in asdict(self).items() if k not in PAGE_ONLY + ("sets",)}
        for extra in ("hard_negatives", "hard_words"):  # absent before they were drawn
            if not shown[extra]:
                shown.pop(extra)
        for group in ("examples", "positives", "negatives", "hard_negatives"):
            for sample in shown.get(group, []):
                sample.pop("activation_overlay")
                sample.pop("quantile")
        return hashlib.sha256(json.dumps(shown, sort_keys=True).encode()).hexdigest()

    def samples(self) -> list[Sample]:
        """Every sample of every group."""
        return [s for g in GROUPS for s in getattr(self, g)]


def read_evidence(folder: str | Path) -> list[FeatureEvidence]:
    """The evidence of every feature written by `autointerp_evidence_job`."""
    path = Path(folder) / EVIDENCE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no evidence file (run the autointerp_evidence rule)")
    raw = json.loads(path.read_text())
    out = []
    for f in raw["features"]:
        groups = {g: [Sample(**s) for s in f.get(g, [])] for g in GROUPS}
        out.append(FeatureEvidence(**{**f, **groups}))
    return out


def interleave(ranked: Mapping[str, Sequence[tuple[int, Hashable]]], n: int
               ) -> list[tuple[str, int]]:
    """Up to `n` (source, row) taken in turn from each source's ranked rows (best first),
    skipping rows whose key was already taken from any source."""
    seen: set[Hashable] = set()
    out: list[tuple[str, int]] = []
    queues = {s: list(rows) for s, rows in ranked.items()}
    while len(out) < n and any(queues.values()):
        for source, queue in queues.items():
            while queue:
                row, key = queue.pop(0)
                if key not in seen:
                    seen.add(key)
                    out.append((source, row))
                    break
            if len(out) == n:
                break
    return out


def autointerp_features(selected_path: str | Path, contrasts: Sequence[str],
                        max_features: int) -> pd.DataFrame:
    """The selected features of `contrasts`, the best `max_features` of each, by rank."""
    table = pd.read_parquet(selected_path)
    missing = {"contrast", "rank", "layer", "feature"} - set(table.columns)
    if missing:
        raise ValueError(f"{selected_path}: missing columns {sorted(missing)}")
    table = table[table["contrast"].isin(list(contrasts))].sort_values(["contrast", "rank"])
    return table.groupby("contrast", sort=False).head(max_features).reset_index(drop=True)


def page_features(described: pd.DataFrame, features_path: str | Path,
                  contrasts: Sequence[str], members: bool) -> pd.DataFrame:
    """The features that get a page: the described ones, then (`members`) every other member
    of the `contrasts`' sets by contrast and rank; `described` and `sets` columns say which."""
    table = pd.read_parquet(features_path)
    sets = [c for c in contrasts if f"{c}_set" in table.columns]
    key = list(zip(table["layer"], table["feature"], strict=True))
    member_of = {k: [c for c in sets if bool(table[f"{c}_set"].iloc[i])]
                 for i, k in enumerate(key)}
    out = described[["layer", "feature", "contrast", "rank"]].assign(described=True)
    if members:
        taken = set(zip(out["layer"], out["feature"], strict=True))
        extra = [table.loc[table[f"{c}_set"].astype(bool), ["layer", "feature", f"{c}_rank"]]
                 .rename(columns={f"{c}_rank": "rank"}).assign(contrast=c, described=False)
                 .sort_values("rank") for c in sets]
        if extra:
            rest = pd.concat(extra).drop_duplicates(["layer", "feature"])
            # a boolean array, not a list: an empty list would select no columns
            rest = rest.loc[np.array([k not in taken for k in zip(rest["layer"], rest["feature"],
                                                                  strict=True)], dtype=bool)]
            out = pd.concat([out, rest[out.columns]], ignore_index=True)
    out["sets"] = [member_of.get((int(a), int(b)), []) for a, b in
                   zip(out["layer"], out["feature"], strict=True)]
    return out.astype({"layer": int, "feature": int, "rank": int}).reset_index(drop=True)


# ------------------------------------------------------------------------- token activations


def token_activations(
    model: torch.nn.Module,
    processor: Any,
    ds: Dataset,
    features: Mapping[int, Sequence[int]],
    saes: Mapping[int, Any],
    *,
    batch_size: int,
    device: torch.device,
) -> tuple[list[list[str]], dict[int, list[np.ndarray]]]:
    """Per row of `ds` (`question`, `image`): its prompt tokens, and per layer the features'
    activations on them, `[n_tokens, len(features[layer])]`, as the statistics pass sees them."""
    from vlmdiff.hooks import prompt_activations

    tokens: list[list[str]] = []
    acts: dict[int, list[np.ndarray]] = {layer: [] for layer in features}
    for _, inputs, span, batch_acts in prompt_activations(model, processor, ds, features, saes,
                                                          batch_size=batch_size, device=device):
        counts = span.sum(dim=1).tolist()
        for i in range(span.shape[0]):
            ids = inputs["input_ids"][i][span[i]].tolist()
            tokens.append(processor.tokenizer.convert_ids_to_tokens(ids))
        for layer, a in batch_acts.items():
            acts[layer] += [part.float().cpu().numpy() for part in a.split(counts)]
    return tokens, acts


def holdout_positives(candidates: Sequence[Sample], n: int, quantiles: int,
                      rng: np.random.Generator) -> list[Sample]:
    """`n` held-out positives from the top samples after the described ones (strongest first):
    the next `n` with `quantiles` 1, else delphi's sampler, `n // quantiles` from each of
    `quantiles` equal slices of the candidates ranked by activation (`n` slices where `n` is
    smaller), so that weak activations are scored as well as the top ones."""
    if quantiles <= 1:
        return list(candidates[:n])
    picked = quantile_sample([s.activation for s in candidates], min(quantiles, n), n, rng)
    return [candidates[i] for i, _ in picked]
