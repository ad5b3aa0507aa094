"""The lexical filter: does a candidate feature still fire when its question is replaced?

A feature recruited by spatial questions may only be reading a word ("left"). For each
candidate we take its top-activating samples, keep the image, replace the question by each
neutral prompt, re-run the VLM with the adapted SAEs hooked onto the candidates' layers, and
keep the feature if it still fires on at least a given fraction of (sample, prompt) pairs.

"Fires" means `h_f > 0` on some prompt token: a text token after the image span (the tokens
that see both the image and the prompt), as for the top-activating samples of the statistics
pass. The SAEs read each layer's output without replacing it (the hook of `vlmdiff.sae.splice`
returns its input unchanged), so every candidate is scored on the unmodified VLM even when
candidates of several layers share one forward pass.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch

from vlmdiff.features.selection import LEXICAL_COLUMNS
from vlmdiff.files import write_table
from vlmdiff.hooks import prompt_activations
from vlmdiff.logs import Log
from vlmdiff.sae.topk import TopKSAE

if TYPE_CHECKING:
    from datasets import Dataset


def sample_maxima(
    model: torch.nn.Module,
    processor: Any,
    ds: Dataset,
    features: Mapping[int, Sequence[int]],
    saes: Mapping[int, TopKSAE],
    *,
    batch_size: int,
    device: torch.device,
) -> dict[int, np.ndarray]:
    """Per layer, `max_t h_f` over each row's prompt tokens: `[len(ds), len(features[layer])]`.

    `ds` has `question` and `image` columns, encoded exactly as for the activation caches.
    """
    out = {layer: np.zeros((len(ds), len(f)), np.float32) for layer, f in features.items()}
    for lo, _, span, acts in prompt_activations(model, processor, ds, features, saes,
                                                batch_size=batch_size, device=device):
        rows = torch.nonzero(span)[:, 0]
        for layer, a in acts.items():
            best = a.new_zeros(span.shape[0], a.shape[1])
            best.scatter_reduce_(0, rows[:, None].expand_as(a), a, "amax")
            out[layer][lo : lo + span.shape[0]] = best.cpu().numpy()
    return out


def unknown_words(tokenizer: Any, prompts: Sequence[str]) -> dict[str, list[str]]:
    """Words of each prompt that the tokenizer maps to its unknown token."""
    unk = tokenizer.unk_token_id
    found = {}
    for p in prompts:
        enc = tokenizer(p, add_special_tokens=False, return_offsets_mapping=True)
        words = [
            p[a:b]
            for i, (a, b) in zip(enc["input_ids"], enc["offset_mapping"], strict=True)
            if unk is not None and i == unk
        ]
        if words:
            found[p] = words
    return found


def lexical_filter(
    model: torch.nn.Module,
    processor: Any,
    ds: Dataset,
    samples: Mapping[tuple[int, int], np.ndarray],
    saes: Mapping[int, TopKSAE],
    prompts: Sequence[str],
    *,
    min_fraction: float,
    batch_size: int,
    device: torch.device,
    log: Log = print,
) -> pd.DataFrame:
    """Pass rate under the neutral `prompts` of each (layer, feature) in `samples`.

    `samples` maps a candidate to its top-activating rows of `ds` (a split with `question` and
    `image`). Each distinct row is run once per prompt, and once with its own question (the
    `original_rate`, a check that the candidate fired there at all). A candidate passes when
    it fires on at least `min_fraction` of its (row, prompt) pairs; one without samples fails.
    """
    if not samples:
        return pd.DataFrame(columns=list(LEXICAL_COLUMNS))
    rows = np.unique(np.concatenate([np.asarray(r, dtype=np.int64) for r in samples.values()]))
    where = {int(r): i for i, r in enumerate(rows)}
    features: dict[int, list[int]] = {}
    for layer, feature in samples:
        features.setdefault(layer, []).append(feature)
    column = {key: features[key[0]].index(key[1]) for key in samples}
    sub = ds.select(rows.tolist()).select_columns(["question", "image"])

    fired = []
    for i, prompt in enumerate([None, *prompts]):
        run = sub
        if prompt is not None:
            run = sub.remove_columns("question").add_column("question", [prompt] * len(sub))
        best = sample_maxima(
            model, processor, run, features, saes, batch_size=batch_size, device=device
        )
        fired.append({layer: b > 0 for layer, b in best.items()})
        log(f"lexical filter: prompt {i}/{len(prompts)} done ({len(sub)} samples)")

    out = []
    for (layer, feature), picked in samples.items():
        idx = [where[int(r)] for r in picked]
        hits = np.array([f[layer][idx, column[(layer, feature)]] for f in fired])  # [1 + P, n]
        rate = float(hits[1:].mean()) if len(idx) else float("nan")
        out.append(
            {
                "layer": layer,
                "feature": feature,
                "n_samples": len(idx),
                "n_prompts": len(prompts),
                "original_rate": float(hits[0].mean()) if len(idx) else float("nan"),
                "pass_rate": rate,
                "passed": bool(len(idx) and rate >= min_fraction),
            }
        )
    return pd.DataFrame(out, columns=list(LEXICAL_COLUMNS))


def lexical_filter_job(
    *,
    vlm_dir: str | Path,
    split_path: str | Path,
    stats_paths: Sequence[str | Path],
    sae_dirs: Mapping[int, str | Path],
    contrast: str,
    thresholds: Mapping[str, Any],
    frequency: Mapping[str, Any],
    prompts: Sequence[str],
    n_samples: int,
    min_fraction: float,
    batch_size: int,
    device: str,
    out: Mapping[str, str | Path],
    log: Log = print,
) -> pd.DataFrame:
    """The `lexical_filter` rule for one contrast (`spatial` or `ocr`), its verdicts to
    `out["table"]`.

    Finds the contrast's candidates from the statistics (`thresholds` on Δp and OR,
    `frequency`: `tokens`, `smoothing`, `ci_level`), then filters them; loads the VLM only
    when there are candidates.
    """
    from vlmdiff.features.selection import (
        candidates,
        feature_statistics,
        read_statistics,
        top_samples,
    )
    from vlmdiff.models.build import load_vlm, resolve_device
    from vlmdiff.world.layouts import load_split

    table = feature_statistics(read_statistics(stats_paths), None, **frequency)
    cands = candidates(table, contrast, thresholds)
    log(f"{contrast}: {len(cands)} candidates of {len(table)} features")
    if cands.empty:
        log(f"{contrast}: no candidates, nothing to filter")
        empty = pd.DataFrame(columns=list(LEXICAL_COLUMNS))
        write_table(empty, out["table"])
        return empty
    samples = top_samples(stats_paths, contrast, cands, n_samples)
    dev = resolve_device(device)
    model, processor = load_vlm(Path(vlm_dir), dev)
    for prompt, words in unknown_words(processor.tokenizer, prompts).items():
        log(f"warning: neutral prompt {prompt!r}: {words} are not in the vocabulary")
    layers = sorted(int(layer) for layer in cands["layer"].unique())
    saes = {layer: TopKSAE.load(sae_dirs[layer], device=dev) for layer in layers}
    verdicts = lexical_filter(
        model,
        processor,
        load_split(split_path),
        samples,
        saes,
        prompts,
        min_fraction=min_fraction,
        batch_size=batch_size,
        device=dev,
        log=log,
    )
    log(f"{contrast}: {int(verdicts['passed'].sum())}/{len(verdicts)} candidates pass")
    result = cands.merge(verdicts, on=["layer", "feature"], how="left")
    write_table(result, out["table"])
    return result
