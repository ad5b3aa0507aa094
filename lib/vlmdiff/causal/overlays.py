"""Attention overlays of the heads found by attribution patching (paper figures 4, 14, 15, 16).

Each overlay is one head's attention from the prompt tokens (the question and the answer
position) to the image patches, averaged over those tokens, upsampled to the picture and drawn
over it. Heads are ranked per feature and method by |score| of one attribution variant.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pandas as pd
import xarray as xr

from vlmdiff.causal.ablation import relation_subset, top_vsr_rows, vsr_split
from vlmdiff.causal.attention import attention_to_image
from vlmdiff.causal.figures import Overlay, fig14_feature_panels, overlay_grid
from vlmdiff.causal.focus import focus_rows, focus_summary
from vlmdiff.causal.heads import feature_head_scores, head_label, ranked_heads
from vlmdiff.files import write_table
from vlmdiff.logs import Log
from vlmdiff.plots import save


def recurring_head(ds: xr.Dataset, variant: str, n: int = 3) -> tuple[tuple[int, int] | None,
                                                                      list[str]]:
    """The head most often among the top-`n` (either method) across features, and the features
    that have it there ("related" features); ties go to the larger summed normalised score."""
    counts: Counter[tuple[int, int]] = Counter()
    weight: Counter[tuple[int, int]] = Counter()
    members: dict[tuple[int, int], list[str]] = {}
    for feat in ds["feature"].values:
        heads = set()
        for m in ("A", "B"):
            grid = abs(feature_head_scores(ds, feat, m, variant))
            peak = float(grid.max()) or 1.0
            for h in ranked_heads(grid, n):
                heads.add(h)
                weight[h] += float(grid.sel(layer=h[0], head=h[1])) / peak
        for h in heads:
            counts[h] += 1
            members.setdefault(h, []).append(str(feat))
    if not counts:
        return None, []
    best = max(counts, key=lambda h: (counts[h], weight[h]))
    return best, members[best]


class Sample(NamedTuple):
    source: str  # "VQA" or "VSR"
    row: int
    image: Any
    question: str
    scene: str | None  # the shapes world's ground truth, as JSON


class Sources:
    """Top-activating VQA and VSR samples of each feature, with their images, questions and
    (shapes world) scenes."""

    def __init__(self, val: Any, vsr: Any, vqa_top: Mapping[str, np.ndarray],
                 vsr_top: Mapping[str, np.ndarray]) -> None:
        self.val, self.vsr, self.vqa_top, self.vsr_top = val, vsr, vqa_top, vsr_top

    def picks(self, feat: str, n: int) -> list[tuple[str, Any, str]]:
        """Up to `n` (source, image, question) pairs per source, VQA first."""
        return [(s.source, s.image, s.question) for s in self.rows(feat, n)]

    def rows(self, feat: str, n: int) -> list[Sample]:
        """Up to `n` samples per source, VQA first."""
        out = []
        for name, ds, top in (("VQA", self.val, self.vqa_top), ("VSR", self.vsr, self.vsr_top)):
            has_scene = "scene" in ds.column_names
            for r in list(top.get(feat, []))[:n]:
                row = ds[int(r)]
                out.append(Sample(name, int(r), row["image"], row["question"],
                                  row["scene"] if has_scene else None))
        return out


@dataclass(frozen=True)
class OverlaySettings:
    """Which heads are drawn over which samples (the `causal.overlays` keys, the attribution
    variant that ranks heads, and how the feature's VSR rows are found)."""

    variant: str
    n_heads: int
    samples_per_source: int
    top_vsr: int
    min_relation_share: float
    template: str
    custom_queries: Sequence[str]
    unrelated_queries: Sequence[str]
    custom_images: int
    device: str
    object_samples: int


def attention_overlays_job(
    *,
    vlm_dir: str | Path,
    attribution_path: str | Path,
    val_path: str | Path,
    vsr_path: str | Path,
    stats_paths: Sequence[str | Path],
    vsr_acts_path: str | Path,
    settings: OverlaySettings,
    out: Mapping[str, str | Path],
    log: Log = print,
) -> dict[str, Any]:
    """The `attention_overlays` rule: figures 4, 14, 15 and 16 (`out["fig4"]`, ..., each with a
    `_pdf`); returns them (matplotlib figures) and the top-head table (`heads`)."""
    figures = overlay_figures(vlm_dir, attribution_path, val_path, vsr_path, stats_paths,
                              vsr_acts_path, settings, log)
    for key in ("fig4", "fig14", "fig15", "fig16"):
        save(figures[key], out[key], out[f"{key}_pdf"])
    write_table(figures["focus"], out["focus"])
    return figures


def overlay_figures(
    vlm_dir: str | Path,
    attribution_path: str | Path,
    val_path: str | Path,
    vsr_path: str | Path,
    stats_paths: Sequence[str | Path],
    vsr_acts_path: str | Path,
    settings: OverlaySettings,
    log: Log = print,
) -> dict[str, Any]:
    """Figures 14, 15, 4 and 16 as matplotlib figures (keys `fig14`, `fig15`, `fig4`,
    `fig16`) and the top-head table (`heads`)."""
    from vlmdiff.causal.figures import top_head_summary
    from vlmdiff.features.selection import top_samples
    from vlmdiff.models.build import load_vlm, resolve_device
    from vlmdiff.world.layouts import load_split

    variant = settings.variant

    ds = xr.load_dataset(attribution_path)
    heads_table = top_head_summary(ds, variant, settings.n_heads)
    feats = [str(f) for f in ds["feature"].values]
    if not feats:
        log("no selected features: the overlay figures say so")
        empty = "no selected features: no heads to draw"
        return {
            "fig14": fig14_feature_panels(ds, variant, {}, {}),
            "fig15": overlay_grid([], "Bottom-ranked heads (control)", [], empty),
            "fig4": overlay_grid([], "A recurring head across related features", [], empty),
            "fig16": overlay_grid([], "A high-attribution head under custom queries", [], empty),
            "heads": heads_table,
            "focus": focus_summary(pd.DataFrame()),
        }
    dev = resolve_device(settings.device)
    model, processor = load_vlm(Path(vlm_dir), dev)
    val = load_split(val_path)
    vsr, _ = vsr_split(vsr_path, settings.template)
    acts = xr.load_dataarray(vsr_acts_path)
    table = pd.DataFrame({"layer": ds["feature_layer"].values,
                          "feature": ds["feature_index"].values})
    # ranked lists, so one read serves the overlays' first few and the focus table's more
    vqa_rows = top_samples(stats_paths, "val", table,
                           max(settings.samples_per_source, settings.object_samples))
    vqa_top = {f: vqa_rows.get((int(a), int(b)), np.zeros(0, int))
               for f, a, b in zip(feats, table["layer"], table["feature"], strict=True)}
    vsr_top = {f: top_vsr_rows(acts, f, settings.top_vsr) for f in feats}
    relations = {f: ", ".join(relation_subset(np.asarray(vsr["relation"]), vsr_top[f],
                                              settings.min_relation_share)[0])
                 for f in feats}
    samples = Sources(val, vsr, vqa_top, vsr_top)

    def draw(head: tuple[int, int], picks: Sequence[tuple[str, Any, str]], note: str,
             queries: Sequence[str] | None = None) -> list[Overlay]:
        if not picks:
            return []
        qs = list(queries) if queries is not None else [q for _, _, q in picks]
        images = [img for _, img, _ in picks]
        grids = attention_to_image(model, processor, images, qs, [head], device=dev)
        return [Overlay(img, grids[i, 0], head, qs[i], f"{note} ({src})")
                for i, (src, img, _) in enumerate(picks)]

    panels, controls = {}, []
    for feat in feats:
        picks = samples.picks(feat, 1)
        scores = {m: feature_head_scores(ds, feat, m, variant) for m in ("A", "B")}
        tops = {m: ranked_heads(s, 1)[0] for m, s in scores.items()}
        bottoms = {m: ranked_heads(s, 1, bottom=True)[0] for m, s in scores.items()}
        panels[feat] = [o for m in ("A", "B") for o in draw(tops[m], picks, f"top head, {m}")]
        controls.append([o for m in ("A", "B")
                         for o in draw(bottoms[m], picks, f"bottom head, {m}")])
    log(f"overlays for {len(feats)} feature(s): top and bottom heads")
    out: dict[str, Any] = {"heads": heads_table}
    out["focus"] = head_focus(ds, feats, variant, samples, settings.object_samples, model,
                              processor, dev, log)
    out["fig14"] = fig14_feature_panels(ds, variant, panels, relations)
    out["fig15"] = overlay_grid(
        controls, "Bottom-ranked heads (control): attention of the lowest-|score| head per "
        "method on the same top-activating samples", feats, "no overlays")

    head, related = recurring_head(ds, variant, settings.n_heads)
    assert head is not None
    owned = [(f, p) for f in related for p in samples.picks(f, 1)][:4]
    picks = [p for _, p in owned]
    top_row = draw(head, picks, "recurring head")
    middle = []
    for owner, pick in owned:
        bottom = ranked_heads(feature_head_scores(ds, owner, "B", variant), 1, bottom=True)[0]
        middle += draw(bottom, [pick], f"bottom head of {owner}")
    unrelated_queries = settings.unrelated_queries
    unrelated = [unrelated_queries[i % len(unrelated_queries)] for i in range(len(picks))]
    bottom_row = draw(head, picks, "unrelated query", unrelated) if unrelated_queries else []
    out["fig4"] = overlay_grid(
        [top_row, middle, bottom_row],
        f"{head_label(*head)} recurs among the top heads of {', '.join(related)}: its "
        "attention on their top samples (top), bottom-ranked heads (middle), unrelated "
        "queries (bottom)",
        [f"{head_label(*head)}, own queries", "bottom-ranked heads", f"{head_label(*head)}, "
         "unrelated queries"], "no overlays")
    images = []
    for f in feats:
        images += [p for p in samples.picks(f, 1) if p[0] == "VQA"]
    images = images[:settings.custom_images]
    custom = settings.custom_queries
    rows = [draw(head, [p] * len(custom), "custom query", custom) for p in images]
    out["fig16"] = overlay_grid(
        rows, f"{head_label(*head)} (a high-attribution head) under custom queries",
        [f"image {i + 1}" for i in range(len(rows))], "no images")
    log(f"recurring head {head_label(*head)} among the top heads of {related}")
    return out


def head_focus(ds: xr.Dataset, feats: Sequence[str], variant: str, samples: Sources, n: int,
               model: Any, processor: Any, device: Any, log: Log = print) -> pd.DataFrame:
    """`focus_summary` of each feature's top and bottom head by methods A and B over its top
    `n` VQA and VSR samples: how much of the head's image attention falls on the named
    objects' patches, against an even spread."""
    rows = []
    for feat in feats:
        picks = [p for p in samples.rows(feat, n) if p.scene]
        if not picks:
            continue
        heads = {}
        for m in ("A", "B"):
            grid = feature_head_scores(ds, feat, m, variant)
            heads[m, "top"] = ranked_heads(grid, 1)[0]
            heads[m, "bottom"] = ranked_heads(grid, 1, bottom=True)[0]
        order = list(dict.fromkeys(heads.values()))
        questions = [p.question for p in picks]
        maps = attention_to_image(model, processor, [p.image for p in picks], questions, order,
                                  device=device)
        for (m, rank), head in heads.items():
            for r in focus_rows(maps[:, order.index(head)], [p.scene for p in picks], questions):
                p = picks[r.pop("sample")]
                rows.append({"feature": feat, "method": m, "rank": rank, "layer": head[0],
                             "head": head[1], "source": p.source, "row": p.row,
                             "question": p.question, **r})
    table = focus_summary(pd.DataFrame(rows))
    for (m, rank), part in table.groupby(["method", "rank"]):
        log(f"method {m}, {rank} heads: {part['share'].mean():.2f} of the image attention on the "
            f"named objects, against {part['even'].mean():.2f} for an even spread "
            f"(lift {part['lift'].mean():.2f}, {len(part)} feature(s))")
    return table
