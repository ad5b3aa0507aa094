"""The `autointerp_evidence` job: the VLM and SAEs run over the samples of each feature that
gets a page (`vlmdiff.interp.evidence` says what a feature's evidence holds)."""

from __future__ import annotations

import json
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import xarray as xr

from vlmdiff.files import atomic_dir
from vlmdiff.interp.evidence import (
    EVIDENCE_FILE,
    SOURCES,
    FeatureEvidence,
    Sample,
    autointerp_features,
    holdout_positives,
    interleave,
    page_features,
    token_activations,
)
from vlmdiff.interp.pictures import attention_text, heat_overlay, picture, save_png, scene_text
from vlmdiff.logs import Log

# ------------------------------------------------------------------------- the job


class _Sources:
    """The three sample sources as datasets with `question` and `image` columns."""

    def __init__(self, val_path: str | Path, spatial_path: str | Path, vsr_path: str | Path,
                 template: str) -> None:
        from vlmdiff.causal.ablation import vsr_split
        from vlmdiff.world.layouts import load_split

        vsr, _ = vsr_split(vsr_path, template)
        self.data = {"VQA": load_split(val_path), "VQA-spatial": load_split(spatial_path),
                     "VSR": vsr}
        self.texts = {"VQA": self.data["VQA"]["question"],
                      "VQA-spatial": self.data["VQA-spatial"]["question"],
                      "VSR": vsr["caption"]}
        self.scenes = {s: (d["scene"] if "scene" in d.column_names else [""] * len(d))
                       for s, d in self.data.items()}
        self.keys = {
            s: (list(zip(d["image_id"], self.texts[s], strict=True)) if "image_id" in d.column_names
                else [(s, i) for i in range(len(d))])
            for s, d in self.data.items()}

    def key(self, source: str, row: int) -> Hashable:
        return self.keys[source][row]

    def question(self, source: str, row: int) -> str:
        """The prompt the VLM read (for VSR: the caption as a question)."""
        return self.data[source][row]["question"]


def _ranked(stats_top: Mapping[str, Mapping[tuple[int, int], np.ndarray]],
            vsr_best: np.ndarray, key: tuple[int, int], sources: _Sources
            ) -> dict[str, list[tuple[int, Hashable]]]:
    ranked = {}
    for source, split in (("VQA", "val"), ("VQA-spatial", "spatial")):
        rows = [int(r) for r in stats_top[split].get(key, []) if r >= 0]
        ranked[source] = [(r, sources.key(source, r)) for r in rows]
    order = np.argsort(-vsr_best, kind="stable")
    ranked["VSR"] = [(int(r), sources.key("VSR", int(r))) for r in order if vsr_best[r] > 0]
    return ranked


def feature_heads(attribution: xr.Dataset | None, label: str, variant: str,
                  n: int) -> list[tuple[int, int]]:
    """The feature's top `n` heads by Method B (the paper's more reliable one), or none where
    the causal stage did not score it."""
    from vlmdiff.causal.heads import feature_head_scores, ranked_heads

    if attribution is None or label not in set(attribution["feature"].values.tolist()):
        return []
    return ranked_heads(feature_head_scores(attribution, label, "B", variant), n)


@dataclass(frozen=True)
class EvidenceSettings:
    """Which features are described (the `autointerp` keys), the samples each gets, the heads
    drawn (the attribution variant that ranks them; the VSR question template), and what the
    pages show (`autointerp.pages`)."""

    contrasts: Sequence[str]
    max_features: int
    k: int
    holdout: int
    negatives: int
    negative_max_fraction: float
    n_heads: int
    variant: str
    template: str
    batch_size: int
    seed: int
    device: str
    quantiles: int = 1
    hard_negatives: int = 0
    set_members: bool = False
    quantile_bins: int = 4
    per_bin: int = 2
    histogram_bins: int = 20


def autointerp_evidence_job(
    *,
    vlm_dir: str | Path,
    val_path: str | Path,
    spatial_path: str | Path,
    vsr_path: str | Path,
    stats_paths: Sequence[str | Path],
    selected_path: str | Path,
    features_path: str | Path,
    sae_dirs: Mapping[int, str | Path],
    attribution_path: str | Path,
    settings: EvidenceSettings,
    out: Mapping[str, str | Path],
    log: Log = print,
) -> list[FeatureEvidence]:
    """The `autointerp_evidence` rule: samples, pictures, token activations and heat maps of
    each feature with a page, into the folder `out["evidence"]` (`evidence.json`, `img/`,
    `acts/`, `overlay/`; the described features first), which appears only once complete."""
    from vlmdiff.causal.heads import feature_label, head_label
    from vlmdiff.features.lexical import sample_maxima
    from vlmdiff.features.selection import top_samples
    from vlmdiff.interp.logit_effects import logit_effects, unembedding
    from vlmdiff.models.build import load_vlm, resolve_device
    from vlmdiff.sae.topk import TopKSAE

    with atomic_dir(out["evidence"]) as tmp:
        folder = Path(tmp)
        contrasts, variant = settings.contrasts, settings.variant
        k, batch_size = settings.k, settings.batch_size
        described = autointerp_features(selected_path, contrasts, settings.max_features)
        table = page_features(described, features_path, contrasts, settings.set_members)
        keys = [(int(a), int(b)) for a, b in zip(table["layer"], table["feature"], strict=True)]
        log(f"{len(described)} feature(s) of {list(contrasts)} for auto-interpretation, "
            f"{len(keys)} with a page")
        result: list[FeatureEvidence] = []
        if keys:
            dev = resolve_device(settings.device)
            model, processor = load_vlm(Path(vlm_dir), dev)
            sources = _Sources(val_path, spatial_path, vsr_path, settings.template)
            by_layer: dict[int, list[int]] = {}
            for layer, f in keys:
                by_layer.setdefault(layer, []).append(f)
            saes = {layer: TopKSAE.load(sae_dirs[layer], device=dev) for layer in by_layer}
            depth = k + settings.holdout * settings.quantiles
            stats_top = {split: top_samples(stats_paths, split, table, depth)
                         for split in ("val", "spatial")}
            best = {name: sample_maxima(model, processor, sources.data[name].select_columns(
                ["question", "image"]), by_layer, saes, batch_size=batch_size, device=dev)
                for name in ("VSR", "VQA")}
            with xr.open_dataset(attribution_path) as ds:
                attribution = ds.load()
            w_u = unembedding(model)
            rng = np.random.default_rng(settings.seed)
            page_rng = np.random.default_rng([settings.seed, 1])
            for row, (layer, f) in zip(table.itertuples(index=False), keys, strict=True):
                label, j = feature_label(layer, f), by_layer[layer].index(f)
                ranked = _ranked(stats_top, best["VSR"][layer][:, j], (layer, f), sources)
                heads = feature_heads(attribution, label, variant, settings.n_heads)
                samples = _describe_rows(model, processor, sources,
                                         interleave(ranked, depth if row.described else k),
                                         layer, f, saes[layer], batch_size, dev)
                ev = FeatureEvidence(label, layer, f, str(row.contrast), int(row.rank),
                                     [head_label(*h) for h in heads], samples[:k], [], [],
                                     logit_effects(w_u, saes[layer].feature_directions()[f],
                                                   processor.tokenizer),
                                     described=bool(row.described), sets=list(row.sets))
                if row.described:
                    _validation_samples(ev, samples, ranked, best["VQA"][layer][:, j], settings,
                                        model, processor, sources, saes[layer], rng, dev)
                _page_samples(ev, best["VQA"][layer][:, j], settings, model, processor, sources,
                              saes[layer], page_rng, dev)
                _draw(ev, heads, model, processor, sources, folder, dev, saes[layer])
                result.append(ev)
                log(f"{label}: {len(ev.examples)} example(s), {len(ev.positives)} held-out "
                    f"positive(s), {len(ev.negatives)} random and {len(ev.hard_negatives)} hard "
                    f"negative(s), {len(ev.quantile_examples)} quantile example(s), firing density "
                    f"{ev.histogram['density']:.3f}, heads {ev.heads or 'none'}")
        doc = {"features": [asdict(e) for e in result], "sources": list(SOURCES),
               "attribution_variant": variant}
        (folder / EVIDENCE_FILE).write_text(json.dumps(doc, indent=1))
        return result



def _validation_samples(ev: FeatureEvidence, samples: Sequence[Sample],
                        ranked: Mapping[str, Sequence[tuple[int, Hashable]]], maxima: np.ndarray,
                        settings: EvidenceSettings, model: Any, processor: Any,
                        sources: _Sources, sae: Any, rng: np.random.Generator,
                        dev: torch.device) -> None:
    """A described feature's held-out positives, random and hard negatives."""
    from vlmdiff.interp.distribution import hard_negative_rows, top_words

    ev.positives = holdout_positives(samples[settings.k:], settings.holdout,
                                     settings.quantiles, rng)
    ev.negatives = _negatives(model, processor, sources, rng, ranked, samples,
                              settings.negatives, settings.negative_max_fraction, ev.layer,
                              ev.feature, sae, settings.batch_size, dev)
    if settings.hard_negatives <= 0:
        return
    ev.hard_words = top_words([s.tokens for s in ev.examples],
                              [s.token_acts for s in ev.examples], n=5)
    taken = {key for rows in ranked.values() for _, key in rows}
    exclude = {r for r in range(len(sources.data["VQA"])) if sources.key("VQA", r) in taken}
    exclude |= {s.row for s in ev.negatives}
    top = max((s.activation for s in samples), default=0.0)
    rows = hard_negative_rows(sources.texts["VQA"], maxima, ev.hard_words,
                              settings.negative_max_fraction * top, exclude,
                              settings.hard_negatives)
    ev.hard_negatives = _describe_rows(model, processor, sources, [("VQA", r) for r in rows],
                                       ev.layer, ev.feature, sae, settings.batch_size, dev,
                                       label=0)


def _page_samples(ev: FeatureEvidence, maxima: np.ndarray, settings: EvidenceSettings,
                  model: Any, processor: Any, sources: _Sources, sae: Any,
                  rng: np.random.Generator, dev: torch.device) -> None:
    """The page's histogram over D_base and its examples across activation quantiles."""
    from vlmdiff.interp.distribution import activation_histogram, quantile_rows

    ev.histogram = activation_histogram(maxima, settings.histogram_bins)
    picks = quantile_rows(maxima, settings.quantile_bins, settings.per_bin, rng)
    bins = dict(picks)
    ev.quantile_examples = _describe_rows(model, processor, sources,
                                          [("VQA", r) for r, _ in picks], ev.layer, ev.feature,
                                          sae, settings.batch_size, dev)
    for s in ev.quantile_examples:
        s.quantile = bins[s.row]


def _describe_rows(model: Any, processor: Any, sources: _Sources, picks: Sequence[tuple[str, int]],
                   layer: int, f: int, sae: Any, batch_size: int, dev: torch.device,
                   label: int = 1) -> list[Sample]:
    """Samples for (source, row) picks, with their prompt tokens' activations of feature `f`."""
    out: list[Sample] = []
    for source in SOURCES:
        rows = [r for s, r in picks if s == source]
        if not rows:
            continue
        ds = sources.data[source].select(rows).select_columns(["question", "image"])
        tokens, acts = token_activations(model, processor, ds, {layer: [f]}, {layer: sae},
                                         batch_size=batch_size, device=dev)
        for j, r in enumerate(rows):
            a = acts[layer][j][:, 0]
            out.append(Sample(source, r, sources.texts[source][r], float(a.max(initial=0.0)),
                              label, scene=scene_text(sources.scenes[source][r]),
                              tokens=tokens[j], token_acts=[round(float(v), 4) for v in a]))
    order = {p: i for i, p in enumerate(picks)}
    return sorted(out, key=lambda s: order[(s.source, s.row)])


def _negatives(model: Any, processor: Any, sources: _Sources, rng: np.random.Generator,
               ranked: Mapping[str, Sequence[tuple[int, Hashable]]], positives: Sequence[Sample],
               n: int, max_fraction: float, layer: int, f: int, sae: Any, batch_size: int,
               dev: torch.device) -> list[Sample]:
    """`n` random D_base samples where the feature stays below `max_fraction` of its top
    activation (the quietest of those drawn where too few do)."""
    if n <= 0:
        return []
    taken = {key for rows in ranked.values() for _, key in rows}
    pool = [r for r in range(len(sources.data["VQA"])) if sources.key("VQA", r) not in taken]
    draw = rng.choice(pool, size=min(len(pool), 4 * n), replace=False) if pool else []
    cands = _describe_rows(model, processor, sources, [("VQA", int(r)) for r in draw], layer, f,
                           sae, batch_size, dev, label=0)
    top = max((s.activation for s in positives), default=0.0)
    quiet = [s for s in cands if s.activation <= max_fraction * top]
    rest = sorted((s for s in cands if s.activation > max_fraction * top),
                  key=lambda s: s.activation)
    return (quiet + rest)[:n]


def _draw(ev: FeatureEvidence, heads: Sequence[tuple[int, int]], model: Any, processor: Any,
          sources: _Sources, out: Path, dev: torch.device, sae: Any) -> None:
    """Each sample's picture, the feature's own activation over it and, where the feature has
    heads, their attention heat map, as PNGs."""
    from vlmdiff.causal.attention import attention_to_image
    from vlmdiff.interp.image_acts import image_token_activations

    samples = ev.samples()
    if not samples:
        return
    images = [sources.data[s.source][s.row]["image"] for s in samples]
    questions = [sources.question(s.source, s.row) for s in samples]
    grids = None
    if heads:
        grids = attention_to_image(model, processor, images, questions, list(heads),
                                   device=dev).mean(axis=1)
    acts = image_token_activations(model, processor, images, questions, ev.layer, ev.feature,
                                   sae, device=dev)
    # one scale for all of the feature's samples, so that the pictures compare
    acts = acts / max(float(acts.max(initial=0.0)), 1e-12)
    for i, (s, img) in enumerate(zip(samples, images, strict=True)):
        s.image = f"img/{ev.label}_{i}.png"
        save_png(picture(img), out / s.image)
        s.activation_overlay = f"acts/{ev.label}_{i}.png"
        save_png(heat_overlay(img, acts[i]), out / s.activation_overlay)
        if grids is not None:
            s.overlay = f"overlay/{ev.label}_{i}.png"
            save_png(heat_overlay(img, grids[i]), out / s.overlay)
            s.overlay_text = attention_text(grids[i], sources.scenes[s.source][s.row], ev.heads)
