"""The statistics pass of stages 2–3: an adapted SAE over cached activations, streamed.

For each split (`val` = D_base, `spatial` = D_sp, `ocr` = D_ocr) and layer, the pass keeps running
sums only — firing counts and squared activations per feature and token type, and each
feature's top-activating samples — reading one store chunk at a time, so memory does not grow
with the size of a cache. No threshold enters here; `vlmdiff.features.selection` turns the sums into the
per-feature table and the sets.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
import xarray as xr

from vlmdiff.cache.read import iter_sample_chunks, open_store
from vlmdiff.features.selection import TOKEN_TYPES
from vlmdiff.files import write_netcdf
from vlmdiff.logs import Log
from vlmdiff.sae.topk import TopKSAE


def prompt_token_mask(sample: np.ndarray, position: np.ndarray, is_image: np.ndarray) -> np.ndarray:
    """Text tokens after their sample's image span (every text token of a sample without one).

    These are the tokens that can see both the image and the question (chat tokens before the
    image see neither); top-activating samples and the lexical filter use them.
    """
    _, inverse = np.unique(sample, return_inverse=True)
    last_image = np.full(inverse.max(initial=-1) + 1, -1, dtype=np.int64)
    np.maximum.at(last_image, inverse[is_image], position[is_image].astype(np.int64))
    return ~is_image & (position > last_image[inverse])


class FeatureAccumulator:
    """Running per-feature sums over the tokens of one split.

    `n_fire[t, f]` counts tokens of type `t` (0 text, 1 image) with `h_f > 0`, `sum_sq[t, f]`
    sums `h_f^2` over them, and `top_value[r, f]` / `top_sample[r, f]` hold the `n_top` samples
    with the largest `max_t h_f` over their prompt tokens (sample -1 where fewer fired).
    """

    def __init__(self, d_sae: int, n_top: int) -> None:
        self.d_sae, self.n_top = d_sae, n_top
        self.n_fire = torch.zeros(2 * d_sae, dtype=torch.int64)
        self.sum_sq = torch.zeros(2 * d_sae, dtype=torch.float64)
        self.n_tokens = np.zeros(2, dtype=np.int64)
        self.samples: set[int] = set()
        self.top_value = torch.zeros(n_top, d_sae)
        self.top_sample = torch.full((n_top, d_sae), -1, dtype=torch.int64)

    def add_tokens(self, acts: torch.Tensor, indices: torch.Tensor, is_image: np.ndarray) -> None:
        """Count the sparse codes `(acts, indices)` `[n, k]` of `n` tokens."""
        kind = torch.from_numpy(is_image.astype(np.int64))[:, None].to(indices.device)
        flat = (kind * self.d_sae + indices).flatten()
        values = acts.flatten()
        fired = values > 0
        size = 2 * self.d_sae
        self.n_fire += torch.bincount(flat[fired], minlength=size).cpu()
        self.sum_sq += torch.bincount(flat, weights=values.double() ** 2, minlength=size).cpu()
        self.n_tokens += np.bincount(is_image.astype(np.int64), minlength=2)

    def add_sample_max(self, samples: np.ndarray, best: torch.Tensor) -> None:
        """Merge per-sample maxima `best` `[len(samples), d_sae]` of whole samples into the top."""
        self.samples.update(int(s) for s in samples)
        values = torch.cat([self.top_value, best.float().cpu()])
        ids = torch.cat(
            [self.top_sample, torch.from_numpy(samples.astype(np.int64))[:, None].expand_as(best)]
        )
        k = min(self.n_top, values.shape[0])
        top, where = values.topk(k, dim=0)
        self.top_value[:k], self.top_sample[:k] = top, ids.gather(0, where)

    def result(self) -> dict[str, np.ndarray]:
        """The sums as arrays: `n_fire`, `sum_sq` `[2, d_sae]`, `n_tokens` `[2]`, the top."""
        sample = self.top_sample.numpy().copy()
        sample[self.top_value.numpy() <= 0] = -1
        return {
            "n_fire": self.n_fire.view(2, self.d_sae).numpy(),
            "sum_sq": self.sum_sq.view(2, self.d_sae).numpy(),
            "n_tokens": self.n_tokens.copy(),
            "n_samples": np.int64(len(self.samples)),
            "top_value": self.top_value.numpy().copy(),
            "top_sample": sample.astype(np.int32),
        }


@torch.no_grad()
def split_statistics(
    paths: Sequence[str | Path],
    layer: int,
    sae: TopKSAE,
    *,
    batch_tokens: int,
    n_top: int,
) -> dict[str, np.ndarray]:
    """Stream one split's stores (all shards) through `sae` at `layer`; see `FeatureAccumulator`.

    Memory holds one chunk of the store and `batch_tokens x d_sae` pre-activations, whatever
    the size of the split.
    """
    acc = FeatureAccumulator(sae.d_sae, n_top)
    for path in paths:
        for block in iter_sample_chunks(path, layer):
            samples, local = np.unique(block["sample"], return_inverse=True)
            prompt = prompt_token_mask(block["sample"], block["position"], block["is_image"])
            best = torch.zeros(len(samples) * sae.d_sae, device=sae.device)
            for a in range(0, len(local), batch_tokens):
                rows = slice(a, a + batch_tokens)
                x = torch.from_numpy(block["acts"][rows].astype(np.float32)).to(sae.device)
                acts, indices, _ = sae.encode(x)
                acc.add_tokens(acts, indices, block["is_image"][rows])
                keep = torch.from_numpy(prompt[rows]).to(sae.device)
                owner = torch.from_numpy(local[rows]).to(sae.device)[keep]
                flat = (owner[:, None] * sae.d_sae + indices[keep]).flatten()
                best.scatter_reduce_(0, flat, acts[keep].flatten(), "amax")
            acc.add_sample_max(samples, best.view(len(samples), sae.d_sae))
    return acc.result()


def layer_statistics(
    caches: Mapping[str, Sequence[str | Path]],
    layer: int,
    sae: TopKSAE,
    *,
    batch_tokens: int,
    n_top: int,
    log: Log = print,
) -> xr.Dataset:
    """`split_statistics` for each split of `caches` (`{split: store paths}`) as one Dataset.

    Variables: `n_fire`, `sum_sq` (split, token_type, feature), `n_tokens` (split,
    token_type), `n_samples` (split), `top_value`, `top_sample` (split, rank, feature).
    """
    results = {}
    for split, paths in caches.items():
        results[split] = split_statistics(paths, layer, sae, batch_tokens=batch_tokens, n_top=n_top)
        r = results[split]
        log(
            f"layer {layer} {split}: {r['n_samples']} samples, {r['n_tokens'][0]} text + "
            f"{r['n_tokens'][1]} image tokens, {int((r['n_fire'].sum(0) > 0).sum())}/{sae.d_sae} "
            "features fire"
        )
    splits = list(caches)

    def stack(name: str) -> np.ndarray:
        return np.stack([results[s][name] for s in splits])

    dims = {
        "n_fire": ("split", "token_type", "feature"),
        "sum_sq": ("split", "token_type", "feature"),
        "n_tokens": ("split", "token_type"),
        "n_samples": ("split",),
        "top_value": ("split", "rank", "feature"),
        "top_sample": ("split", "rank", "feature"),
    }
    return xr.Dataset(
        {name: (d, stack(name)) for name, d in dims.items()},
        coords={
            "split": splits,
            "token_type": list(TOKEN_TYPES),
            "feature": np.arange(sae.d_sae),
            "rank": np.arange(n_top),
            "layer": layer,
        },
        attrs={
            "description": "per-feature sums of an adapted SAE's activations over cached splits",
            "n_fire": "tokens with h_f > 0",
            "sum_sq": "sum of h_f^2",
            "top_value": "max of h_f over a sample's prompt tokens (text after the image)",
            "top_sample": "row of the sample in its split; -1 where fewer samples fired",
        },
    )


def feature_stats_job(
    *,
    sae_dir: str | Path,
    layer: int,
    caches: Mapping[str, Sequence[str | Path]],
    batch_tokens: int,
    n_top: int,
    device: str,
    out: Mapping[str, str | Path],
    log: Log = print,
) -> xr.Dataset:
    """The `feature_stats` rule: load one layer's adapted SAE, stream the caches (split ->
    shard stores) through it, the statistics to `out["stats"]`."""
    from vlmdiff.models.build import resolve_device

    sae = TopKSAE.load(sae_dir, device=resolve_device(device))
    for split, paths in caches.items():
        for p in paths:
            width = open_store(p)[f"layer_{layer}"].shape[1]
            if width != sae.d_model:
                raise ValueError(
                    f"SAE {sae_dir} has d_model {sae.d_model} but cache {p} ({split}, layer "
                    f"{layer}) has {width}"
                )
    stats = layer_statistics(caches, layer, sae, batch_tokens=batch_tokens, n_top=n_top, log=log)
    stats = stats.assign_attrs(sae=str(sae_dir), regime=str(sae.extra.get("regime", "")))
    write_netcdf(stats, out["stats"])
    return stats
