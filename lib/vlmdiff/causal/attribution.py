"""Attribution patching from an SAE feature to the attention heads that drive it (paper 5.2, App. C).

Objective. For a feature f of layer L with unit decoder direction v, `J = Σ_t y_L[t] · v`, the
projection of the output of decoder block L onto v, summed over the *prompt span*: the text
tokens after the image span (the question and the answer position). These are the tokens on
which the feature was selected and its top-activating samples were ranked, and the only text
tokens that see both the image and the question; image tokens precede the question and, under
causal attention, cannot carry a question-dependent feature.

Runs. Clean: the image–question input. Corrupt: the same input with the layer-0 image token
embeddings (the projector's outputs) replaced by their per-patch mean over many VQA images
(`mean_image_embedding`, a cached artifact): plausible statistics, no image content.

Scores. For every head of every layer, from one forward and one backward pass per run:
Method A `(corr − clean) · ∇clean` and Method B `(clean − corr) · ∇corr`, with the dot product
over positions and head dimensions of

- `query`: the head's (rotated) queries;
- `key`: the keys as the head sees them. Under grouped-query attention one key-value head
  serves `G` query heads; the gradient of the shared key is the sum of the gradients through
  each of its query heads, so `key` credits a query head with its own share (the shares of a
  group add up to the KV head's score exactly), while `key_kv` gives every query head of the
  group the whole KV head's score (what patching the shared key itself would estimate);
- `qk` = `query + key` (the paper's query/key variant, per query head), `qk_kv` = `query + key_kv`;
- `output`: the head's slice of the input to `o_proj`;
- `qk_atpstar` (AtP*'s query-key fix, optional): patching a head's queries and keys together
  replaces its attention pattern by the other run's, so the softmax is recomputed exactly and
  only the pattern is linearised: `(P_other − P) · ∇P`.

Every variant is stored; per-sample scores are averaged over the feature's top-k D_base samples.
`exact_patching` patches heads one at a time for the check against the linear estimates.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import xarray as xr

from vlmdiff.causal.attention import AttentionProbe, head_counts, kv_head_of, probe_attention
from vlmdiff.causal.context import CausalContext, feature_coords, feature_label
from vlmdiff.causal.heads import feature_head_scores, head_label, ranked_heads  # noqa: F401 (re-exported)
from vlmdiff.files import write_netcdf, write_table
from vlmdiff.hooks import replace_layer_output
from vlmdiff.inputs import prompt_span, row_batches
from vlmdiff.logs import Log, progress_line
from vlmdiff.models.build import projector

METHODS = ("A", "B")
VARIANTS = ("qk", "qk_kv", "query", "key", "key_kv", "output")
ATP_STAR = "qk_atpstar"
PATCH_VARIANTS = ("qk", "output")  # what exact_patching patches
RECORDED = ("query", "key", "output", "pattern")


# ------------------------------------------------------------------------- corruption


@contextmanager
def mean_image_corruption(model: torch.nn.Module, mean: torch.Tensor) -> Iterator[None]:
    """Replace every image's token embeddings (projector outputs) by `mean` `[patches, d]`."""

    def hook(_module, _args, output):
        return mean.to(output).expand_as(output)

    handle = projector(model).register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


@torch.no_grad()
def mean_image_embedding(
    model: torch.nn.Module,
    processor: Any,
    images: Sequence[Any],
    *,
    batch_size: int,
    device: torch.device,
    log: Log = print,
) -> xr.DataArray:
    """Per-patch mean of the projector's outputs over `images`: `[patch, dim]` (float32)."""
    if not images:
        raise ValueError("mean image embedding: no images given")
    total: torch.Tensor | None = None
    seen: list[torch.Tensor] = []
    handle = projector(model).register_forward_hook(lambda _m, _a, out: seen.append(out))
    start = time.perf_counter()
    try:
        for lo in range(0, len(images), batch_size):
            chunk = list(images[lo : lo + batch_size])
            pixels = processor.image_processor(chunk, return_tensors="pt")["pixel_values"]
            model.model.get_image_features(
                pixel_values=pixels.to(device, model.dtype),
                vision_feature_layer=model.config.vision_feature_layer,
                vision_feature_select_strategy=model.config.vision_feature_select_strategy,
            )
            part = seen.pop().float().sum(0)
            total = part if total is None else total + part
            done = min(lo + batch_size, len(images))
            log(progress_line("mean image embedding", done, len(images), start))
    finally:
        handle.remove()
    mean = (total / len(images)).cpu().numpy()
    return xr.DataArray(
        mean, dims=("patch", "dim"), name="mean_image_embedding", attrs={"n_images": len(images)}
    )


# ------------------------------------------------------------------------- runs and scores


def feature_objective(
    model: torch.nn.Module,
    inputs: Mapping[str, torch.Tensor],
    layer: int,
    direction: torch.Tensor,
    span: torch.Tensor,
    probe: AttentionProbe,
    *,
    mean: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-sample objective `Σ_{t ∈ span} y_L[t] · v` `[b]`, the run recorded by `probe`.

    `mean` (per-patch image embeddings) makes it the corrupt run. Gradients flow when enabled.
    """
    store: dict[str, torch.Tensor] = {}

    def grab(h: torch.Tensor) -> torch.Tensor:
        store["h"] = h
        return h

    with ExitStack() as stack:
        stack.enter_context(probe_attention(model, probe))
        stack.enter_context(replace_layer_output(model, layer, grab))
        if mean is not None:
            stack.enter_context(mean_image_corruption(model, mean))
        model.model(**inputs, use_cache=False)
    h = store["h"] if store["h"].dtype == torch.float64 else store["h"].float()
    return ((h @ direction.to(h)) * span).sum(dim=1)


def _run_with_grads(
    model: torch.nn.Module,
    inputs: Mapping[str, torch.Tensor],
    layer: int,
    direction: torch.Tensor,
    span: torch.Tensor,
    mean: torch.Tensor | None,
) -> tuple[torch.Tensor, dict[int, dict[str, torch.Tensor]], dict[int, dict[str, torch.Tensor]]]:
    """One forward and one backward pass: objective `[b]`, recordings and their gradients."""
    probe = AttentionProbe(range(layer + 1), detach=False)
    with torch.enable_grad():
        objective = feature_objective(model, inputs, layer, direction, span, probe, mean=mean)
        names = [(lay, n) for lay in sorted(probe.records) for n in RECORDED]
        tensors = [probe.records[lay][n] for lay, n in names]
        grads = torch.autograd.grad(objective.sum(), tensors, allow_unused=True)
    records: dict[int, dict[str, torch.Tensor]] = {}
    gradients: dict[int, dict[str, torch.Tensor]] = {}
    for (lay, n), t, g in zip(names, tensors, grads, strict=True):
        records.setdefault(lay, {})[n] = t.detach()
        gradients.setdefault(lay, {})[n] = torch.zeros_like(t) if g is None else g.detach()
    return objective.detach(), records, gradients


def head_scores(
    delta: Mapping[int, Mapping[str, torch.Tensor]],
    grads: Mapping[int, Mapping[str, torch.Tensor]],
    n_layers: int,
    n_kv_heads: int,
    *,
    atp_star: bool,
) -> np.ndarray:
    """`delta · grad` per sample, variant, layer and query head: `[b, variant, layer, head]`.

    `delta` and `grads` map layer -> recorded name -> tensor; layers missing (after the
    objective's layer) score 0. Variants in `VARIANTS` order, then `qk_atpstar` if asked.
    """
    variants = [*VARIANTS, ATP_STAR] if atp_star else list(VARIANTS)
    first = next(iter(delta.values()))["query"]
    b, n_heads = first.shape[0], first.shape[1]
    out = np.zeros((b, len(variants), n_layers, n_heads), np.float64)
    group = n_heads // n_kv_heads
    for layer in delta:
        d, g = delta[layer], grads[layer]
        query = (d["query"].float() * g["query"].float()).sum((2, 3))
        key = (d["key"].float() * g["key"].float()).sum((2, 3))
        key_kv = key.view(b, n_kv_heads, group).sum(-1).repeat_interleave(group, dim=1)
        output = (d["output"].float() * g["output"].float()).sum((1, 3))
        per = {
            "qk": query + key,
            "qk_kv": query + key_kv,
            "query": query,
            "key": key,
            "key_kv": key_kv,
            "output": output,
        }
        if atp_star:
            per[ATP_STAR] = (d["pattern"].float() * g["pattern"].float()).sum((2, 3))
        for i, v in enumerate(variants):
            out[:, i, layer] = per[v].double().cpu().numpy()
    return out


def attribute(
    model: torch.nn.Module,
    inputs: Mapping[str, torch.Tensor],
    layer: int,
    direction: torch.Tensor,
    mean: torch.Tensor,
    *,
    atp_star: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Methods A and B for one batch: scores `[b, method, variant, layer, head]` and the clean
    and corrupt objectives `[b, 2]`. Two forward and two backward passes in all."""
    span = prompt_span(inputs["input_ids"], inputs["attention_mask"], model.config.image_token_id)
    n_layers, _, n_kv = head_counts(model)
    j_clean, clean, g_clean = _run_with_grads(model, inputs, layer, direction, span, None)
    j_corr, corr, g_corr = _run_with_grads(model, inputs, layer, direction, span, mean)
    delta = {lay: {n: corr[lay][n] - clean[lay][n] for n in RECORDED} for lay in clean}
    method_a = head_scores(delta, g_clean, n_layers, n_kv, atp_star=atp_star)
    neg = {lay: {n: -t for n, t in d.items()} for lay, d in delta.items()}
    method_b = head_scores(neg, g_corr, n_layers, n_kv, atp_star=atp_star)
    objectives = torch.stack([j_clean, j_corr], dim=1).double().cpu().numpy()
    return np.stack([method_a, method_b], axis=1), objectives


@torch.no_grad()
def exact_patching(
    model: torch.nn.Module,
    inputs: Mapping[str, torch.Tensor],
    layer: int,
    direction: torch.Tensor,
    mean: torch.Tensor,
    *,
    log: Log | None = None,
) -> tuple[np.ndarray, int]:
    """True objective change of patching each head, one at a time: `[b, method, variant, layer,
    head]` over `PATCH_VARIANTS`, and the number of forward passes used.

    Method "A": the corrupt run's tensors patched into the clean run, `J(clean ← corr) − J(clean)`
    (what Method A estimates); "B": clean into corrupt, `J(corr ← clean) − J(corr)` (Method B).
    `qk` patches the head's queries and its view of the keys; `output` its slice of the
    `o_proj` input. Heads after `layer` cannot change the objective and are left at 0.
    """
    span = prompt_span(inputs["input_ids"], inputs["attention_mask"], model.config.image_token_id)
    n_layers, n_heads, _ = head_counts(model)
    runs: dict[str, tuple[torch.Tensor, dict]] = {}
    for name, m in (("clean", None), ("corr", mean)):
        probe = AttentionProbe(range(layer + 1))
        j = feature_objective(model, inputs, layer, direction, span, probe, mean=m)
        runs[name] = (j, probe.records)
    passes = 2
    b = inputs["input_ids"].shape[0]
    out = np.zeros((b, 2, len(PATCH_VARIANTS), n_layers, n_heads), np.float64)
    start = time.perf_counter()
    total = (layer + 1) * n_heads
    for m, (base, other) in enumerate((("clean", "corr"), ("corr", "clean"))):
        j_base, _ = runs[base]
        source = runs[other][1]
        for lay in range(layer + 1):
            for h in range(n_heads):
                heads = torch.zeros(n_heads, dtype=torch.bool)
                heads[h] = True
                for v, variant in enumerate(PATCH_VARIANTS):
                    names = ("query", "key") if variant == "qk" else ("output",)
                    probe = AttentionProbe([])
                    probe.patches[lay] = {n: (source[lay][n], heads) for n in names}
                    j = feature_objective(
                        model, inputs, layer, direction, span, probe,
                        mean=mean if base == "corr" else None,
                    )
                    out[:, m, v, lay, h] = (j - j_base).double().cpu().numpy()
                    passes += 1
            if log is not None:
                done = m * total + (lay + 1) * n_heads
                log(progress_line("  exact patching, heads", done, 2 * total, start))
    return out, passes


# ------------------------------------------------------------------------- ranking, correlations


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman rank correlation (average ranks for ties); NaN when either side is constant."""
    frame = pd.DataFrame({"x": np.asarray(x, float), "y": np.asarray(y, float)})
    if frame["x"].nunique() < 2 or frame["y"].nunique() < 2:
        return float("nan")
    ranks = frame.rank()  # Pearson on average ranks: pandas' own "spearman" needs scipy
    return float(ranks["x"].corr(ranks["y"]))


def patching_correlations(scores: xr.DataArray, exact: xr.DataArray) -> pd.DataFrame:
    """Spearman of attribution estimates with exact patching, per feature, method and variant.

    Heads of layers up to the feature's own count. Each method is compared with the patch it
    estimates (A: corrupt into clean; B: clean into corrupt) and, for the issue's single
    direction, both with corrupt-into-clean (B after a sign flip: to first order it estimates
    the opposite change). `qk_atpstar` is compared with exact `qk` patching.
    """
    rows = []
    pairs = [("qk", "qk"), ("output", "output")]
    if ATP_STAR in scores["variant"].values:
        pairs.append((ATP_STAR, "qk"))
    for feat in scores["feature"].values:
        lay = int(scores["feature_layer"].sel(feature=feat))
        sc = scores.sel(feature=feat).isel(layer=slice(0, lay + 1))
        ex = exact.sel(feature=feat).isel(layer=slice(0, lay + 1))
        for variant, patched in pairs:
            corrupt_into_clean = ex.sel({"method": "A", "variant": patched}).values.ravel()
            for method in METHODS:
                est = sc.sel({"method": method, "variant": variant}).values.ravel()
                own = ex.sel({"method": method, "variant": patched}).values.ravel()
                sign = 1.0 if method == "A" else -1.0
                rows.append(
                    {
                        "feature": str(feat),
                        "layer": lay,
                        "feature_index": int(scores["feature_index"].sel(feature=feat)),
                        "method": method,
                        "variant": variant,
                        "patched": patched,
                        "n_heads": est.size,
                        "spearman_own_direction": spearman(est, own),
                        "spearman_corrupt_into_clean": spearman(sign * est, corrupt_into_clean),
                    }
                )
    return pd.DataFrame(rows, columns=CHECK_COLUMNS)


CHECK_COLUMNS = ["feature", "layer", "feature_index", "method", "variant", "patched", "n_heads",
                 "spearman_own_direction", "spearman_corrupt_into_clean"]


def attribution_job(
    *,
    vlm_dir: str | Path,
    val_path: str | Path,
    stats_paths: Sequence[str | Path],
    selected_path: str | Path,
    sae_dirs: Mapping[int, str | Path],
    mean_path: str | Path,
    contrast: str,
    max_features: int,
    top_k: int,
    batch_size: int,
    atp_star: bool,
    exact: bool,
    device: str,
    out: Mapping[str, str | Path],
    log: Log = print,
) -> tuple[xr.Dataset, pd.DataFrame]:
    """The `attribution` rule: scores `[feature, method, variant, layer, head]` averaged over
    each feature's top-k D_base samples (+ exact patching effects and their Spearman table when
    `exact`) to `out["scores"]` and `out["check"]`. An empty feature list gives a dataset with a
    zero-length feature dimension."""
    from vlmdiff.features.selection import top_samples
    from vlmdiff.world.layouts import load_split

    ctx = CausalContext(vlm_dir, selected_path, sae_dirs, contrast=contrast,
                        max_features=max_features, device=device, log=log)
    n_layers, n_heads, n_kv = head_counts(ctx.model)
    variants = [*VARIANTS, ATP_STAR] if atp_star else list(VARIANTS)
    with xr.open_dataarray(mean_path) as m:
        mean = torch.from_numpy(m.values).to(ctx.device)
    samples = top_samples(stats_paths, "val", ctx.features, top_k) if len(ctx.features) else {}
    val = load_split(val_path)
    n_f = len(ctx.features)
    scores = np.zeros((n_f, 2, len(variants), n_layers, n_heads))
    objectives = np.full((n_f, 2), np.nan)
    exact_scores = np.zeros((n_f, 2, len(PATCH_VARIANTS), n_layers, n_heads))
    n_samples = np.zeros(n_f, np.int64)
    timing = {"attribution_s": 0.0, "exact_s": 0.0, "attribution_passes": 0, "exact_passes": 0}
    start = time.perf_counter()
    for i, key in enumerate(ctx.keys()):
        rows = samples.get(key, np.zeros(0, np.int64))
        n_samples[i] = len(rows)
        if not len(rows):
            log(f"warning: {feature_label(*key)} has no top-activating samples; scores are 0")
            continue
        parts, objs, ex_parts = [], [], []
        for inputs in row_batches(val, rows, batch_size, ctx.model, ctx.processor, ctx.device):
            t0 = time.perf_counter()
            sc, obj = attribute(ctx.model, inputs, key[0], ctx.directions[key], mean,
                                atp_star=atp_star)
            timing["attribution_s"] += time.perf_counter() - t0
            timing["attribution_passes"] += 4
            parts.append(sc)
            objs.append(obj)
            if exact:
                t0 = time.perf_counter()
                ex, passes = exact_patching(ctx.model, inputs, key[0], ctx.directions[key], mean)
                timing["exact_s"] += time.perf_counter() - t0
                timing["exact_passes"] += passes
                ex_parts.append(ex)
        scores[i] = np.concatenate(parts).mean(0)
        objectives[i] = np.concatenate(objs).mean(0)
        if exact:
            exact_scores[i] = np.concatenate(ex_parts).mean(0)
        log(progress_line("attribution, features", i + 1, n_f, start)
            + f"; objective clean {objectives[i, 0]:.3f}, corrupt {objectives[i, 1]:.3f}")
    coords = {
        **feature_coords(ctx),
        "method": list(METHODS),
        "variant": variants,
        "layer": np.arange(n_layers),
        "head": np.arange(n_heads),
        "kv_head": ("head", kv_head_of(n_heads, n_kv)),
    }
    ds = xr.Dataset(
        {
            "score": (("feature", "method", "variant", "layer", "head"), scores),
            "objective": (("feature", "run"), objectives),
            "n_samples": (("feature",), n_samples),
        },
        coords={**coords, "run": ["clean", "corrupt"]},
        attrs={
            "contrast": contrast,
            "top_k": top_k,
            "objective": "sum over prompt-span tokens of the block-L output projected on the "
            "feature's unit decoder direction",
            "corruption": "layer-0 image token embeddings replaced by their per-patch mean",
            "gqa": "key: a query head's own share of its KV head's score; key_kv: the whole KV "
            "head's score given to each of its query heads",
            **{k: float(v) for k, v in timing.items()},
        },
    )
    table = pd.DataFrame(columns=CHECK_COLUMNS)
    if exact:
        ds["exact"] = (
            ("feature", "method", "patched", "layer", "head"), exact_scores,
        )
        ds = ds.assign_coords(patched=list(PATCH_VARIANTS))
        exact_da = ds["exact"].rename(patched="variant")
        table = patching_correlations(ds["score"], exact_da)
        if len(table):
            summary = table.groupby(["method", "variant"])["spearman_own_direction"].mean()
            log("mean Spearman with exact patching (own direction):\n" + summary.to_string())
    log(f"timing: {timing}")
    write_netcdf(ds, out["scores"])
    write_table(table, out["check"])
    return ds, table


def mean_image_embedding_job(
    *,
    vlm_dir: str | Path,
    split_path: str | Path,
    samples: int,
    batch_size: int,
    seed: int,
    device: str,
    out: Mapping[str, str | Path],
    log: Log = print,
) -> xr.DataArray:
    """The `mean_image_embedding` rule, the corruption artifact: per-patch mean image
    embedding over `samples` distinct images, to `out["mean"]`."""
    from vlmdiff.models.build import load_vlm, resolve_device
    from vlmdiff.world.layouts import load_split

    dev = resolve_device(device)
    model, processor = load_vlm(Path(vlm_dir), dev)
    ds = load_split(split_path)
    _, first = np.unique(np.asarray(ds["image_id"]), return_index=True)
    rng = np.random.default_rng(seed)
    rows = rng.permutation(np.sort(first))[:samples]
    images = ds.select(rows.tolist())["image"]
    log(f"mean image embedding over {len(images)} distinct images of {split_path}")
    mean = mean_image_embedding(model, processor, images, batch_size=batch_size, device=dev,
                                log=log)
    write_netcdf(mean, out["mean"])
    return mean
