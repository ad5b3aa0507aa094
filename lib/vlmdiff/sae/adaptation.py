"""Stage 1 of the method: base SAEs on the LM, adapted SAEs on the VLM, decoder rotation.

Regimes (paper section 4.1): `full` (every token), `image` (the image span), `text` (the rest),
all warm-started from the base SAE, and `random` (random init, every token) as the control.
The SAE always encodes the whole sequence; the regime only picks which tokens enter the loss.
"""

from __future__ import annotations

import shutil
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import xarray as xr

from vlmdiff.logs import Log

if TYPE_CHECKING:
    from vlmdiff.sae.topk import TopKSAE
    from vlmdiff.sae.training import TrainConfig

# torch, the cache reader and the trainer are imported where they are used: the jobs that only
# read tables and draw (adaptation_figures) and the stages that import REGIMES start without them.

REGIMES = ("full", "image", "text", "random")


def loss_regime(regime: str) -> str:
    """The token mask a regime trains on: `random` uses every token, like `full`."""
    if regime not in REGIMES:
        raise ValueError(f"unknown regime {regime!r}; expected one of {REGIMES}")
    return "full" if regime == "random" else regime


def train_config(
    cfg: Mapping[str, Any], where: str, k: int, seed: int, device: str
) -> TrainConfig:
    """A TrainConfig from the `sae.base` or `sae.adapt` config section (`where`)."""
    from vlmdiff.sae.training import TrainConfig

    return TrainConfig.from_mapping(cfg, where, k=k, seed=seed, device=device)


def _stream(paths: Sequence[Path], layer: int, cfg: TrainConfig, regime: str, seed: int):
    from vlmdiff.cache.read import iter_batches

    # Passes repeat until train_sae has seen cfg.max_tokens loss tokens.
    return iter_batches(
        paths, layer, cfg.batch_tokens, regime=regime, seed=seed, max_tokens=sys.maxsize
    )


def _eval_stream(paths: Sequence[Path], layer: int, cfg: TrainConfig, regime: str, limit: int):
    from vlmdiff.cache.read import iter_batches

    def batches():
        return iter_batches(
            paths, layer, cfg.batch_tokens, regime=regime, shuffle=False, max_tokens=limit
        )

    return batches


def check_d_model(paths: Sequence[Path], layer: int, d_model: int, what: str) -> None:
    """Stop before training when an SAE and the cached activations disagree in width."""
    from vlmdiff.cache.read import open_store

    for p in paths:
        width = open_store(p)[f"layer_{layer}"].shape[1]
        if width != d_model:
            raise ValueError(
                f"{what} has d_model {d_model} but the cache {p} (layer {layer}) has {width}"
            )


def train_base(
    layer: int,
    train_paths: Sequence[Path],
    eval_paths: Sequence[Path],
    cfg: TrainConfig,
    expansion: int,
    eval_tokens: int,
    out_dir: Path,
    checkpoint_dir: Path,
    log: Log = print,
) -> pd.DataFrame:
    """A base SAE from random init on the language model's activations (the Llama-Scope analog)."""
    from vlmdiff.cache.read import iter_batches
    from vlmdiff.sae.topk import TopKSAE, estimate_norm_factor
    from vlmdiff.sae.training import train_sae

    sample = next(iter_batches(train_paths, layer, 8192, seed=cfg.seed))[0]
    d_model = sample.shape[1]
    sae = TopKSAE.from_random(
        d_model, expansion * d_model, cfg.k, cfg.seed, norm_factor=estimate_norm_factor(sample)
    )
    result = train_sae(
        sae,
        _stream(train_paths, layer, cfg, "full", cfg.seed),
        cfg,
        eval_batches=_eval_stream(eval_paths, layer, cfg, "full", eval_tokens),
        layer=layer,
        regime="base",
        checkpoint_dir=checkpoint_dir,
        log=log,
    )
    _finish(sae, out_dir, checkpoint_dir, layer, "base", result.tokens_seen)
    return pd.DataFrame(result.history)


def adapt(
    layer: int,
    regime: str,
    base_dir: Path,
    train_paths: Sequence[Path],
    eval_paths: Sequence[Path],
    cfg: TrainConfig,
    eval_tokens: int,
    out_dir: Path,
    checkpoint_dir: Path,
    log: Log = print,
) -> pd.DataFrame:
    """Adapt the base SAE of `layer` to the VLM's activations under `regime`."""
    from vlmdiff.sae.topk import TopKSAE
    from vlmdiff.sae.training import evaluate, train_sae

    base = TopKSAE.load(base_dir, k=cfg.k)
    check_d_model(train_paths, layer, base.d_model, f"base SAE {base_dir}")
    if regime == "random":
        sae = TopKSAE.from_random(
            base.d_model, base.d_sae, cfg.k, cfg.seed + 1, norm_factor=float(base.norm_factor)
        )
    else:
        sae = base
    mask = loss_regime(regime)
    result = train_sae(
        sae,
        _stream(train_paths, layer, cfg, mask, cfg.seed),
        cfg,
        eval_batches=_eval_stream(eval_paths, layer, cfg, mask, eval_tokens),
        layer=layer,
        regime=regime,
        checkpoint_dir=checkpoint_dir,
        log=log,
    )
    # FVU of the final SAE on each token type, so regimes can be compared on common ground.
    history = pd.DataFrame(result.history)
    for tokens in ("full", "image", "text"):
        stats = evaluate(sae, _eval_stream(eval_paths, layer, cfg, tokens, eval_tokens)())
        history.loc[history.index[-1], f"final_fvu_{tokens}_tokens"] = stats["fvu"]
    _finish(sae, out_dir, checkpoint_dir, layer, regime, result.tokens_seen)
    return history


def _finish(
    sae: TopKSAE, out_dir: Path, checkpoint_dir: Path, layer: int, regime: str, tokens: int
) -> None:
    sae.save(
        out_dir,
        {"layer": layer, "regime": regime, "k": sae.k, "tokens_seen": tokens},
        hook_point=f"blocks.{layer}.hook_resid_post",
    )
    shutil.rmtree(checkpoint_dir, ignore_errors=True)


def decoder_cosine(base: TopKSAE, other: TopKSAE) -> np.ndarray:
    """Per feature: cosine between the base decoder column and the other SAE's."""
    import torch

    if base.W_dec.shape != other.W_dec.shape:
        raise ValueError(f"decoder shapes differ: {tuple(base.W_dec.shape)} vs {tuple(other.W_dec.shape)}")
    with torch.no_grad():
        a = torch.nn.functional.normalize(base.W_dec.float(), dim=0)
        b = torch.nn.functional.normalize(other.W_dec.float(), dim=0)
        return (a * b).sum(0).cpu().numpy()


def decoder_cosines(
    base_dirs: Mapping[int, Path], adapted_dirs: Mapping[tuple[str, int], Path]
) -> xr.DataArray:
    """Decoder cosine for every (regime, layer, feature) as an xarray DataArray."""
    from vlmdiff.sae.topk import TopKSAE

    regimes = sorted({r for r, _ in adapted_dirs}, key=REGIMES.index)
    layers = sorted(base_dirs)
    values = None
    for li, layer in enumerate(layers):
        base = TopKSAE.load(base_dirs[layer])
        for ri, regime in enumerate(regimes):
            cos = decoder_cosine(base, TopKSAE.load(adapted_dirs[(regime, layer)]))
            if values is None:
                values = np.full((len(regimes), len(layers), cos.shape[0]), np.nan, np.float32)
            values[ri, li] = cos
    return xr.DataArray(
        values,
        dims=("regime", "layer", "feature"),
        coords={"regime": regimes, "layer": layers, "feature": np.arange(values.shape[2])},
        name="decoder_cosine",
        attrs={"description": "cosine(base SAE decoder column, adapted SAE decoder column)"},
    )


def read_histories(paths: Sequence[Path]) -> pd.DataFrame:
    """All adaptation histories in one frame (columns from `train_sae`: layer, regime, ...)."""
    return pd.concat([pd.read_csv(p) for p in paths], ignore_index=True)


def final_table(histories: pd.DataFrame, splice: pd.DataFrame | None = None) -> pd.DataFrame:
    """One row per (layer, regime): final FVU, L0, dead fraction (+ CE loss recovered, KL)."""
    last = histories.sort_values("tokens_seen").groupby(["layer", "regime"]).tail(1)
    first = histories.sort_values("tokens_seen").groupby(["layer", "regime"]).head(1)
    cols = ["layer", "regime", "tokens_seen", "fvu", "l0", "dead_fraction", "fired_fraction"]
    cols += [c for c in histories.columns if c.startswith("final_fvu_")]
    table = last[cols].rename(columns={"fvu": "final_fvu", "l0": "final_l0"})
    start = first[["layer", "regime", "fvu"]].rename(columns={"fvu": "initial_fvu"})
    table = table.merge(start, on=["layer", "regime"])
    if splice is not None:
        keep = ["layer", "regime", "ce_clean", "ce_spliced", "ce_loss_recovered", "kl"]
        table = table.merge(splice[keep], on=["layer", "regime"], how="left")
    order = {r: i for i, r in enumerate(REGIMES)}
    return table.sort_values(["layer", "regime"], key=lambda s: s.map(order) if s.name == "regime" else s)


def regime_summary(table: pd.DataFrame) -> pd.DataFrame:
    """Final FVU per regime across layers (the summary table beside figure 1)."""
    g = table.groupby("regime")["final_fvu"]
    out = pd.DataFrame({"mean": g.mean(), "std": g.std(), "min": g.min(), "max": g.max()})
    out["best"] = out["mean"] == out["mean"].min()
    return out.reindex([r for r in REGIMES if r in out.index]).reset_index()


# ------------------------------------------------------------------------- workflow jobs


def train_base_sae_job(
    *,
    layer: int,
    train_paths: Sequence[str | Path],
    eval_paths: Sequence[str | Path],
    train: Mapping[str, Any],
    k: int,
    expansion: int,
    eval_tokens: int,
    seed: int,
    device: str,
    out: Mapping[str, str | Path],
    log: Log = print,
) -> pd.DataFrame:
    """The `train_base_sae` rule: `train_base` for `layer` under the `sae.base` section `train`
    (seed `seed + layer`), checkpoints beside the SAE; the SAE to `out["sae"]`, the history to
    `out["history"]`."""
    cfg = train_config(train, "sae.base", k, seed + layer, device)
    history = train_base(layer, train_paths, eval_paths, cfg, expansion, eval_tokens,
                         out["sae"], f"{out['sae']}.checkpoint", log=log)
    history.to_csv(out["history"], index=False)
    return history


def adapt_sae_job(
    *,
    layer: int,
    regime: str,
    base_dir: str | Path,
    train_paths: Sequence[str | Path],
    eval_paths: Sequence[str | Path],
    train: Mapping[str, Any],
    k: int,
    eval_tokens: int,
    seed: int,
    device: str,
    checkpoint_dir: str | Path,
    out: Mapping[str, str | Path],
    log: Log = print,
) -> pd.DataFrame:
    """The `adapt_sae` rule: `adapt` the base SAE of `layer` under `regime` and the `sae.adapt`
    section `train` (seed `seed + layer`); the SAE to `out["sae"]`, the history to
    `out["history"]`."""
    cfg = train_config(train, "sae.adapt", k, seed + layer, device)
    history = adapt(layer, regime, base_dir, train_paths, eval_paths, cfg, eval_tokens,
                    out["sae"], checkpoint_dir, log=log)
    history.to_csv(out["history"], index=False)
    return history


def decoder_cosine_job(
    *,
    layers: Sequence[int],
    regimes: Sequence[str],
    base_dirs: Sequence[str | Path],
    adapted_dirs: Sequence[str | Path],
    out: Mapping[str, str | Path],
    log: Log = print,
) -> xr.DataArray:
    """The `decoder_cosine` rule: `decoder_cosines` of the base SAEs (one per layer of
    `layers`) and the adapted ones (every regime of `regimes`, then every layer, in that
    order) to `out["netcdf"]`; the mean per regime and layer logged."""
    base = dict(zip(layers, base_dirs, strict=True))
    pairs = [(r, layer) for r in regimes for layer in layers]
    cos = decoder_cosines(base, dict(zip(pairs, adapted_dirs, strict=True)))
    cos.to_netcdf(out["netcdf"])
    log(cos.mean("feature").to_pandas().round(3).to_string())
    return cos


def adaptation_figures_job(
    *,
    history_paths: Sequence[str | Path],
    splice_paths: Sequence[str | Path],
    cosine_path: str | Path,
    out: Mapping[str, str | Path],
    log: Log = print,
) -> pd.DataFrame:
    """The `adaptation_figures` rule: the per-(layer, regime) table (`out["table"]`), its
    per-regime summary (`out["summary"]`) and figures 1, 5 and 6 (`fig1`, `fig5`, `fig6`, each
    with a `_pdf`)."""
    from vlmdiff.plots import fig1_fvu_curves, fig5_decoder_cosine, fig6_fvu_per_layer, save

    histories = read_histories(history_paths)
    splice = pd.concat([pd.read_csv(p) for p in splice_paths], ignore_index=True)
    table = final_table(histories, splice)
    summary = regime_summary(table)
    table.to_csv(out["table"], index=False)
    summary.to_csv(out["summary"], index=False)
    log("\n" + summary.to_string(index=False))
    save(fig1_fvu_curves(histories, summary), out["fig1"], out["fig1_pdf"])
    with xr.open_dataarray(cosine_path) as cos:
        save(fig5_decoder_cosine(cos.load()), out["fig5"], out["fig5_pdf"])
    save(fig6_fvu_per_layer(histories), out["fig6"], out["fig6_pdf"])
    return table
