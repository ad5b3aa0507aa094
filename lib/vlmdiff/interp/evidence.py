"""What auto-interpretation and the dashboards show of a feature (paper 5.1, App. B.1).

Per selected feature: its top-activating samples from VQA (D_base), VQA-spatial (D_sp) and
VSR, taken in turn from each source and de-duplicated (the spatial split repeats D_base
questions); the first `k` are the examples a language model describes, the next ones held-out
positives, and random D_base samples where the feature stays low the negatives. Each sample
carries its picture, the activation of every prompt token, a textual stand-in for the picture
(for text-only models: the scene in words, which the shapes world knows), and, where the
feature has attribution scores, the attention of its top heads drawn over the picture and
summarised in words (which objects hold the most attention).
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
import torch
import xarray as xr

from vlmdiff.files import atomic_dir, atomic_path
from vlmdiff.interp.pictures import attention_text, heat_overlay, picture, save_png, scene_text
from vlmdiff.interp.scoring import quantile_sample
from vlmdiff.logs import Log

if TYPE_CHECKING:
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


@dataclass
class FeatureEvidence:
    """A feature's examples (described), held-out positives and negatives (validation)."""

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

    def digest(self) -> str:
        """A hash of everything a language model is shown of this feature."""
        shown = {k: v for k, v in asdict(self).items() if k != "logit_effects"}
        for group in ("examples", "positives", "negatives"):
            for sample in shown[group]:
                sample.pop("activation_overlay")
        return hashlib.sha256(json.dumps(shown, sort_keys=True).encode()).hexdigest()


def read_evidence(folder: str | Path) -> list[FeatureEvidence]:
    """The evidence of every feature written by `write_evidence`."""
    path = Path(folder) / EVIDENCE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no evidence file (run the autointerp_evidence rule)")
    raw = json.loads(path.read_text())
    out = []
    for f in raw["features"]:
        groups = {g: [Sample(**s) for s in f[g]] for g in ("examples", "positives", "negatives")}
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
    from vlmdiff.causal.attribution import feature_head_scores, ranked_heads

    if attribution is None or label not in set(attribution["feature"].values.tolist()):
        return []
    return ranked_heads(feature_head_scores(attribution, label, "B", variant), n)


@dataclass(frozen=True)
class EvidenceSettings:
    """Which features are described (the `autointerp` keys), the samples each gets, and the
    heads drawn (the attribution variant that ranks them; the VSR question template)."""

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


def autointerp_evidence_job(
    *,
    vlm_dir: str | Path,
    val_path: str | Path,
    spatial_path: str | Path,
    vsr_path: str | Path,
    stats_paths: Sequence[str | Path],
    selected_path: str | Path,
    sae_dirs: Mapping[int, str | Path],
    attribution_path: str | Path,
    settings: EvidenceSettings,
    out: Mapping[str, str | Path],
    log: Log = print,
) -> list[FeatureEvidence]:
    """The `autointerp_evidence` rule: `write_evidence` into the folder `out["evidence"]`,
    which appears only once complete."""
    with atomic_dir(out["evidence"]) as tmp:
        return write_evidence(vlm_dir, val_path, spatial_path, vsr_path, stats_paths,
                              selected_path, sae_dirs, attribution_path, tmp, settings, log)


def write_evidence(
    vlm_dir: str | Path,
    val_path: str | Path,
    spatial_path: str | Path,
    vsr_path: str | Path,
    stats_paths: Sequence[str | Path],
    selected_path: str | Path,
    sae_dirs: Mapping[int, str | Path],
    attribution_path: str | Path,
    out_dir: str | Path,
    settings: EvidenceSettings,
    log: Log = print,
) -> list[FeatureEvidence]:
    """Samples, pictures, token activations and heat maps of each feature, into `out_dir`
    (`evidence.json`, `img/`, `acts/`, `overlay/`)."""
    from vlmdiff.causal.attribution import head_label
    from vlmdiff.causal.context import feature_label
    from vlmdiff.features.lexical import sample_maxima
    from vlmdiff.features.selection import top_samples
    from vlmdiff.interp.logit_effects import logit_effects, unembedding
    from vlmdiff.models.build import load_vlm, resolve_device
    from vlmdiff.sae.topk import TopKSAE

    out = Path(out_dir)
    contrasts, variant = settings.contrasts, settings.variant
    k, batch_size = settings.k, settings.batch_size
    table = autointerp_features(selected_path, contrasts, settings.max_features)
    keys = [(int(a), int(b)) for a, b in zip(table["layer"], table["feature"], strict=True)]
    log(f"{len(keys)} feature(s) of {list(contrasts)} for auto-interpretation")
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
        vsr_best = sample_maxima(model, processor, sources.data["VSR"].select_columns(
            ["question", "image"]), by_layer, saes, batch_size=batch_size, device=dev)
        with xr.open_dataset(attribution_path) as ds:
            attribution = ds.load()
        w_u = unembedding(model)
        rng = np.random.default_rng(settings.seed)
        for i, (layer, f) in enumerate(keys):
            label = feature_label(layer, f)
            ranked = _ranked(stats_top, vsr_best[layer][:, by_layer[layer].index(f)],
                             (layer, f), sources)
            picks = interleave(ranked, depth)
            heads = feature_heads(attribution, label, variant, settings.n_heads)
            samples = _describe_rows(model, processor, sources, picks, layer, f, saes[layer],
                                     batch_size, dev)
            negs = _negatives(model, processor, sources, rng, ranked, samples,
                              settings.negatives, settings.negative_max_fraction, layer, f,
                              saes[layer], batch_size, dev)
            positives = holdout_positives(samples[k:], settings.holdout, settings.quantiles,
                                          rng)
            ev = FeatureEvidence(label, layer, f, str(table["contrast"].iloc[i]),
                                 int(table["rank"].iloc[i]), [head_label(*h) for h in heads],
                                 samples[:k], positives, negs, logit_effects(
                                     w_u, saes[layer].feature_directions()[f],
                                     processor.tokenizer))
            _draw(ev, heads, model, processor, sources, out, dev, saes[layer])
            result.append(ev)
            log(f"{label}: {len(ev.examples)} example(s), {len(ev.positives)} held-out "
                f"positive(s), {len(ev.negatives)} negative(s), heads {ev.heads or 'none'}")
    doc = {"features": [asdict(e) for e in result], "sources": list(SOURCES),
           "attribution_variant": variant}
    with atomic_path(out / EVIDENCE_FILE) as tmp:
        tmp.write_text(json.dumps(doc, indent=1))
    return result


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

    samples = ev.examples + ev.positives + ev.negatives
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
