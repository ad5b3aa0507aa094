"""Training loop for TopK SAEs: base SAEs on a language model, and their adaptation to a VLM.

The same loop serves both: a base SAE starts from `TopKSAE.from_random`, an adapted one from a
loaded base SAE (warm start). The regime (full / image / text / random) only changes which tokens
the `loss_mask` of each batch selects; the SAE always encodes every token.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NamedTuple

import torch
from torch import Tensor

from vlmdiff import config
from vlmdiff.sae.checkpoint import (
    CHECKPOINT_FILE,
    TrainState,
    load_checkpoint,
    next_multiple,
    save_checkpoint,
)
from vlmdiff.sae.topk import ForwardOutput, TopKSAE


class Batch(NamedTuple):
    acts: Tensor
    """Residual-stream activations, `[n, d_model]`, any float dtype."""

    loss_mask: Tensor
    """Bool `[n]`: the tokens that contribute to the loss (and to token counts)."""


@dataclass
class TrainConfig:
    """Hyperparameters of `train_sae`; token counts are loss-masked tokens throughout.

    The fields from `lr` to `checkpoint_every_tokens` are the keys of the `sae.base` and
    `sae.adapt` config sections, whose defaults and ranges are the schema's: build one with
    `from_mapping`.

    Learning rate: `lr_at(cfg, d_sae, layer) = lr * scale(d_sae) * layer_lr_decay ** layer`, where
    `scale = 1 / sqrt(d_sae / 2**14)` for `lr_scale_rule="inv_sqrt_d_sae"` (Gao et al. 2024's
    fit, as in sparsify; with `lr=2e-4` it is their default) or `1` for `"constant"`. A per-layer
    factor of 1 keeps one rate for every layer: inputs are already normalised per layer by the
    dataset-wise norm factor, which removes the usual reason (residual norms grow with depth) for
    scaling the rate by layer; below 1, deeper layers take smaller steps.
    """

    k: int
    """Active latents per token (`sae.k`); overrides the SAE's own `k` (a warm start becomes TopK-k)."""

    lr: float
    lr_scale_rule: Literal["inv_sqrt_d_sae", "constant"]
    layer_lr_decay: float

    batch_tokens: int
    """Most rows per optimiser step; larger incoming batches are split into equal chunks."""

    max_tokens: int | None
    """Stop after this many loss tokens; `None` runs until the batches end."""

    eval_every_tokens: int
    auxk_alpha: float

    dead_tokens_threshold: int
    """A latent is dead once it has not fired on this many consecutive loss tokens."""

    checkpoint_every_tokens: int | None
    """Checkpoint period; with a checkpoint folder there is always one at the end as well."""

    seed: int
    device: str

    k_aux: int | None = None
    """Dead latents per token in the AuxK loss; `None` means `d_model // 2`."""

    log_interval_s: float = 30.0

    @classmethod
    def from_mapping(
        cls, d: Mapping[str, Any] | None, where: str, *, k: int, seed: int, device: str
    ) -> TrainConfig:
        """From the config section `where` ("sae.base" or "sae.adapt"), checked against the
        schema with that section's defaults filled in."""
        return config.build(cls, where, d, k=k, seed=seed, device=device)


def lr_at(cfg: TrainConfig, d_sae: int, layer: int) -> float:
    """The learning rate for one SAE, by the rule in `TrainConfig`'s docstring."""
    lr = cfg.lr
    if cfg.lr_scale_rule == "inv_sqrt_d_sae":
        lr /= math.sqrt(d_sae / 2**14)
    return lr * cfg.layer_lr_decay**layer


@dataclass
class TrainResult:
    history: list[dict[str, Any]]
    """One row per evaluation: layer, regime, step, tokens_seen, fvu, l0, fired_fraction (on
    the eval batches; NaN without them), dead_fraction, train_fvu (mean since the last row), lr."""

    tokens_seen: int
    steps: int
    resumed_from_tokens: int
    """Loss tokens already done by the checkpoint this run resumed from (0 if fresh)."""


@torch.no_grad()
def evaluate(
    sae: TopKSAE, batches: Iterable[Batch], *, device: torch.device | str | None = None
) -> dict[str, float]:
    """FVU and L0 over the loss-masked tokens of `batches`, and the fraction of features fired.

    FVU pools all batches: total squared error over total squared deviation from the pooled mean.
    """
    device = sae.device if device is None else torch.device(device)
    n, l0_sum, sse, sum_sq = 0, 0, 0.0, 0.0
    sum_x = torch.zeros(sae.d_model, dtype=torch.float64, device=device)
    fired = torch.zeros(sae.d_sae, dtype=torch.bool, device=device)
    for acts, mask in batches:
        x = acts.to(device)
        m = mask.to(device)
        top_acts, top_indices, _ = sae.encode(x)
        x_hat = sae.decode(top_acts, top_indices)
        xs = x[m].double()
        sse += float((xs - x_hat[m].double()).pow(2).sum())
        sum_x += xs.sum(0)
        sum_sq += float(xs.pow(2).sum())
        n += xs.shape[0]
        on = top_acts[m] > 0
        l0_sum += int(on.sum())
        fired[top_indices[m][on]] = True
    if n == 0:
        return {"fvu": math.nan, "l0": math.nan, "fired_fraction": math.nan, "n_tokens": 0}
    variance = sum_sq - float(sum_x.pow(2).sum()) / n
    return {
        "fvu": sse / variance if variance > 0 else math.nan,
        "l0": l0_sum / n,
        "fired_fraction": float(fired.float().mean()),
        "n_tokens": n,
    }


def train_sae(
    sae: TopKSAE,
    batches: Iterable[Batch],
    cfg: TrainConfig,
    *,
    eval_batches: Callable[[], Iterable[Batch]] | None = None,
    layer: int,
    regime: str,
    checkpoint_dir: Path | None = None,
    log: Callable[[str], None] = print,
) -> TrainResult:
    """Train `sae` in place with Adam on the loss-masked tokens: FVU + auxk_alpha * AuxK.

    Decoder columns stay unit norm (gradient parallel to them removed before each step,
    renormalised after). Evaluates on `eval_batches()` at the start, every `eval_every_tokens`
    and at the end.

    Resumption: when `checkpoint_dir` holds a checkpoint, the SAE, optimiser, history, dead-latent
    counters and RNG state are restored from it, and `batches` is read from its beginning with
    the batches the checkpoint had consumed skipped (read, not trained on). So `batches` must
    yield the same sequence on every call, e.g. a deterministic reader over cached shards. Only
    `RESUMABLE_CHANGES` fields of `cfg` may differ from the checkpointed run; raising
    `max_tokens` continues a finished run.
    """
    device = _resolve_device(cfg.device)
    sae.to(device)
    sae.k = cfg.k
    torch.manual_seed(cfg.seed)
    lr = lr_at(cfg, sae.d_sae, layer)
    opt = make_optimiser(sae, lr)
    sae.set_decoder_norm_to_unit_norm()
    tag = f"[layer {layer} {regime}]"

    state = TrainState(
        step=0,
        tokens_seen=0,
        next_batch=0,
        next_chunk=0,
        tokens_since_fired=torch.zeros(sae.d_sae, dtype=torch.long, device=device),
        history=[],
        next_eval=cfg.eval_every_tokens,
        next_checkpoint=cfg.checkpoint_every_tokens,
    )
    ckpt_path = Path(checkpoint_dir) / CHECKPOINT_FILE if checkpoint_dir is not None else None
    if ckpt_path is not None and ckpt_path.exists():
        state = load_checkpoint(ckpt_path, sae, opt, cfg, layer, regime, device)
        log(f"{tag} resuming from {ckpt_path} at step {state.step}, {state.tokens_seen:,} tokens")
    resumed_from = state.tokens_seen

    def record() -> None:
        ev = (
            evaluate(sae, eval_batches(), device=device)
            if eval_batches is not None
            else {"fvu": math.nan, "l0": math.nan, "fired_fraction": math.nan}
        )
        train_fvu = state.interval_fvu / state.interval_steps if state.interval_steps else math.nan
        state.interval_fvu, state.interval_steps = 0.0, 0
        state.history.append(
            {
                "layer": layer,
                "regime": regime,
                "step": state.step,
                "tokens_seen": state.tokens_seen,
                "fvu": ev["fvu"],
                "l0": ev["l0"],
                "fired_fraction": ev["fired_fraction"],
                "dead_fraction": _dead_fraction(state, cfg),
                "train_fvu": train_fvu,
                "lr": lr,
            }
        )
        log(
            f"{tag} eval at step {state.step}, {state.tokens_seen:,} tokens: fvu {ev['fvu']:.4f}, "
            f"l0 {ev['l0']:.1f}, fired {ev['fired_fraction']:.3f}"
        )

    if not state.history:
        record()

    t0 = last_log = time.monotonic()
    tokens_at_start = state.tokens_seen

    def progress(loss: float, fvu: float, auxk: float) -> None:
        elapsed = max(time.monotonic() - t0, 1e-9)
        rate = (state.tokens_seen - tokens_at_start) / elapsed
        line = f"{tag} step {state.step} tokens {state.tokens_seen:,}"
        if cfg.max_tokens is not None:
            line += f"/{cfg.max_tokens:,}"
        line += f" ({rate:,.0f} tok/s"
        if cfg.max_tokens is not None and rate > 0:
            eta = max(cfg.max_tokens - state.tokens_seen, 0) / rate
            line += f", ETA {_fmt_seconds(eta)}"
        line += (
            f") loss {loss:.4f} fvu {fvu:.4f} auxk {auxk:.4f} dead {_dead_fraction(state, cfg):.3f}"
        )
        log(line)

    def finished() -> bool:
        return cfg.max_tokens is not None and state.tokens_seen >= cfg.max_tokens

    it = iter(batches)
    for skipped in range(state.next_batch):
        if next(it, None) is None:
            raise ValueError(
                f"{tag} checkpoint {ckpt_path} has consumed {state.next_batch} batches, "
                f"but the batches ended after {skipped}"
            )

    batch_index = state.next_batch
    while not finished():
        batch = next(it, None)
        if batch is None:
            break
        acts, mask = batch
        if acts.ndim != 2 or acts.shape[1] != sae.d_model:
            raise ValueError(
                f"{tag} batch {batch_index}: acts of shape {tuple(acts.shape)}, "
                f"expected [n, {sae.d_model}]"
            )
        if mask.dtype != torch.bool or mask.shape != acts.shape[:1]:
            raise ValueError(
                f"{tag} batch {batch_index}: loss_mask must be bool [{acts.shape[0]}]"
                f", got {mask.dtype} {tuple(mask.shape)}"
            )
        if not bool(torch.isfinite(acts).all()):
            raise FloatingPointError(
                f"layer {layer}, regime {regime!r}, step {state.step + 1}: "
                f"activations of batch {batch_index} contain NaN or inf"
            )
        n_chunks = max(1, math.ceil(acts.shape[0] / cfg.batch_tokens))
        acts_chunks = torch.tensor_split(acts, n_chunks)
        mask_chunks = torch.tensor_split(mask, n_chunks)

        for chunk in range(state.next_chunk, n_chunks):
            x = acts_chunks[chunk].to(device, non_blocking=True)
            m = mask_chunks[chunk].to(device, non_blocking=True)
            n_loss = int(m.sum())
            if n_loss >= 2:  # FVU needs a variance, so at least two tokens
                loss, fvu, auxk = _step(sae, opt, x, m, n_loss, state, cfg, layer, regime)
                if time.monotonic() - last_log >= cfg.log_interval_s:
                    progress(loss, fvu, auxk)
                    last_log = time.monotonic()
            state.next_batch, state.next_chunk = (
                (batch_index, chunk + 1) if chunk + 1 < n_chunks else (batch_index + 1, 0)
            )

            if state.tokens_seen >= state.next_eval:
                record()
                state.next_eval = next_multiple(state.tokens_seen, cfg.eval_every_tokens)
            if (
                ckpt_path is not None
                and state.next_checkpoint is not None
                and cfg.checkpoint_every_tokens is not None
                and state.tokens_seen >= state.next_checkpoint
            ):
                save_checkpoint(ckpt_path, sae, opt, state, cfg, layer, regime)
                state.next_checkpoint = next_multiple(
                    state.tokens_seen, cfg.checkpoint_every_tokens
                )
            if finished():
                break
        batch_index += 1

    if state.history[-1]["tokens_seen"] != state.tokens_seen:
        record()
    if ckpt_path is not None:
        save_checkpoint(ckpt_path, sae, opt, state, cfg, layer, regime)
    elapsed = time.monotonic() - t0
    log(
        f"{tag} done: {state.step} steps, {state.tokens_seen:,} tokens "
        f"({state.tokens_seen - tokens_at_start:,} in {_fmt_seconds(elapsed)})"
    )
    return TrainResult(state.history, state.tokens_seen, state.step, resumed_from)


def make_optimiser(sae: TopKSAE, lr: float) -> torch.optim.Adam:
    """Adam, fused where torch has it (much faster on CPU; the same update up to rounding)."""
    try:
        return torch.optim.Adam(sae.parameters(), lr=lr, fused=True)
    except RuntimeError:  # no fused kernel for the device or dtype (CPU before torch 2.4)
        return torch.optim.Adam(sae.parameters(), lr=lr)


def optimiser_step(
    sae: TopKSAE,
    opt: torch.optim.Optimizer,
    x: Tensor,
    loss_mask: Tensor,
    dead_mask: Tensor | None,
    *,
    auxk_alpha: float,
    k_aux: int | None = None,
) -> tuple[ForwardOutput, float]:
    """Forward, FVU + `auxk_alpha` * AuxK, backward, decoder-gradient projection, the optimiser's
    step, renormalisation; FloatingPointError, with no update, if the loss is not finite."""
    sae.recycle_grads()
    out = sae(x, dead_mask=dead_mask, loss_mask=loss_mask, k_aux=k_aux)
    loss = out.fvu + auxk_alpha * out.auxk_loss
    loss_value = loss.item()
    if not math.isfinite(loss_value):
        fvu, auxk = out.fvu.item(), out.auxk_loss.item()
        raise FloatingPointError(f"loss is {loss_value} (fvu {fvu}, auxk {auxk})")
    opt.zero_grad(set_to_none=True)
    loss.backward()
    sae.remove_gradient_parallel_to_decoder_directions()
    opt.step()
    sae.set_decoder_norm_to_unit_norm()
    return out, loss_value


def _step(
    sae: TopKSAE,
    opt: torch.optim.Optimizer,
    x: Tensor,
    m: Tensor,
    n_loss: int,
    state: TrainState,
    cfg: TrainConfig,
    layer: int,
    regime: str,
) -> tuple[float, float, float]:
    """One optimiser step; updates the dead-latent counters and token count in `state`."""
    dead_mask = state.tokens_since_fired >= cfg.dead_tokens_threshold
    try:
        out, loss_value = optimiser_step(
            sae, opt, x, m, dead_mask, auxk_alpha=cfg.auxk_alpha, k_aux=cfg.k_aux
        )
    except FloatingPointError as e:
        where = f"layer {layer}, regime {regime!r}, step {state.step + 1}"
        raise FloatingPointError(f"{where}: {e}") from e

    with torch.no_grad():
        acts, indices = out.latent_acts[m], out.latent_indices[m]
        state.tokens_since_fired += n_loss
        state.tokens_since_fired[indices[acts > 0]] = 0
    state.step += 1
    state.tokens_seen += n_loss
    fvu = out.fvu.item()
    state.interval_fvu += fvu
    state.interval_steps += 1
    return loss_value, fvu, out.auxk_loss.item()


def _dead_fraction(state: TrainState, cfg: TrainConfig) -> float:
    return float((state.tokens_since_fired >= cfg.dead_tokens_threshold).float().mean())


def _resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _fmt_seconds(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"
