"""Llama-Scope SAE releases (e.g. `fnlp/Llama3_1-8B-Base-LXR-8x`) re-instantiated as TopK SAEs.

A release layer folder holds `hyperparams.json` and `checkpoints/final.safetensors` with
`encoder.weight [d_sae, d_model]`, `encoder.bias`, `decoder.weight [d_model, d_sae]` and
`decoder.bias`. The release computes, for an activation `x` at `hook_point_in`:

    s_in  = sqrt(d_model) / dataset_average_activation_norm["in"]
    s_out = sqrt(d_model) / dataset_average_activation_norm["out"]
    h     = W_enc (s_in x - [b_dec if apply_decoder_bias_to_pre_encoder]) + b_enc
    h_s   = h * ||W_dec[:, i]||            (only if sparsity_include_decoder_norm)
    f_s   = h_s * (h_s / s_out > jump_relu_threshold)   (the gate: see below)
    f     = f_s / ||W_dec[:, i]||          (only if sparsity_include_decoder_norm)
    x_hat = (W_dec f + b_dec) / s_out      (b_dec only if use_decoder_bias)

`load_llama_scope` folds this into our `TopKSAE` (`pre = ReLU(W' s_in x + b')`, top-k,
`x_hat = (W_dec' f' + b_dec') / s_in`) exactly, with `r = s_in / s_out` and `c = ||W_dec[:, i]||`:
`W' = r c W_enc`, `b' = r c (b_enc - W_enc b_dec [if applied])`, `W_dec' = W_dec / c` (unit
columns), `b_dec' = r b_dec`. Our pre-activations are then `r * h_s`, so ranking them is ranking
the release's sparsity-side activations, and the reconstruction of any set of kept latents is the
release's reconstruction of the same set.

The release's JumpReLU threshold is not in the units of `h_s` above: the release gates after
folding its dataset norms into the weights (`standardize_parameters_of_dataset_norm`: encoder
bias / s_in, decoder weight * s_in / s_out), where the sparsity score of latent i is
`c_i h_i / s_out`. Keeping `c_i h_i / s_out > t` is `r c_i h_i > r s_out t`, so in our
pre-activation units the gate is `s_in * t` (`r * s_out = s_in`).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from vlmdiff.files import read_json_object
from vlmdiff.sae.folder import (
    HYPERPARAMS_FILE,
    READ_KEYS,
    WEIGHTS_FILE,
    SAEFormatError,
    dataset_norms,
    positive_int,
    read_tensors,
    resid_post_layer,
)
from vlmdiff.sae.topk import TopKSAE

"""Hook points our caches hold: `blocks.L.hook_resid_post` is the output of decoder block L."""

def cache_key(layer: int) -> str:
    """Name of the activation-cache array holding the output of decoder block `layer`."""
    return f"layer_{layer}"


def hook_point_layer(hook_point: Any, source: Path, key: str) -> int:
    """Layer L of a `blocks.L.hook_resid_post` hook point; anything else is an error."""
    layer = resid_post_layer(hook_point)
    if layer is None:
        raise SAEFormatError(
            f"{source}: {key} is {hook_point!r}; only residual-stream SAEs "
            "'blocks.L.hook_resid_post' (output of decoder block L, our cache's layer_L) "
            "are supported"
        )
    return layer


def is_release_format(raw: dict[str, Any]) -> bool:
    """True for the release's hyperparams (JumpReLU), False for ours (`act_fn: "topk"`)."""
    return raw.get("act_fn") == "jumprelu" or "jump_relu_threshold" in raw


def read_hyperparams(folder: str | Path) -> dict[str, Any]:
    """Parse `folder/hyperparams.json`, naming the file when it is missing or not valid JSON."""
    return read_json_object(Path(folder) / HYPERPARAMS_FILE, SAEFormatError, f"SAE folder {folder}")


def check_hook_points(raw: dict[str, Any], source: Path, layer: int) -> str:
    """Both hook points must be `blocks.{layer}.hook_resid_post`; returns it."""
    for key in ("hook_point_in", "hook_point_out"):
        if key not in raw:
            raise SAEFormatError(f"{source}: key {key!r} is missing")
        found = hook_point_layer(raw[key], source, key)
        if found != layer:
            raise SAEFormatError(
                f"{source}: {key} {raw[key]!r} is layer {found}, but layer {layer} was "
                f"requested (our cache's {cache_key(layer)} = output of decoder block {layer})"
            )
    return f"blocks.{layer}.hook_resid_post"


def convert_release(
    raw: dict[str, Any],
    tensors: dict[str, torch.Tensor],
    source: Path,
    *,
    k: int,
    hook_point: str,
    dtype: torch.dtype = torch.float32,
) -> TopKSAE:
    """Fold a release's normalisation and decoder norms into an equivalent `TopKSAE`."""
    d_model, d_sae = positive_int(raw, "d_model", source), positive_int(raw, "d_sae", source)
    if raw.get("act_fn") != "jumprelu":
        raise SAEFormatError(f"{source}: act_fn {raw.get('act_fn')!r}, expected 'jumprelu'")
    threshold = raw.get("jump_relu_threshold", 0.0)
    if not isinstance(threshold, (int, float)) or isinstance(threshold, bool) or threshold < 0:
        raise SAEFormatError(f"{source}: jump_relu_threshold must be >= 0, got {threshold!r}")
    if not 0 < k <= d_sae:
        raise SAEFormatError(f"{source}: k={k} is outside [1, d_sae={d_sae}]")
    n_in, n_out = dataset_norms(raw, source, d_model)
    s_in = math.sqrt(d_model) / n_in
    r = n_out / n_in  # = s_in / s_out

    w_enc, b_enc = tensors["encoder.weight"].double(), tensors["encoder.bias"].double()
    w_dec, b_dec = tensors["decoder.weight"].double(), tensors["decoder.bias"].double()
    if not raw.get("use_decoder_bias", True):
        b_dec = torch.zeros_like(b_dec)
    if raw.get("apply_decoder_bias_to_pre_encoder", False):
        b_enc = b_enc - w_enc @ b_dec
    if raw.get("sparsity_include_decoder_norm", False):
        col_norm = w_dec.norm(dim=0)
        if bool((col_norm == 0).any()):
            raise SAEFormatError(f"{source}: decoder.weight has zero columns")
    else:
        col_norm = torch.ones(d_sae, dtype=torch.float64)
    for name, t in (("encoder", w_enc), ("decoder", w_dec)):
        if not bool(torch.isfinite(t).all()):
            raise SAEFormatError(f"{source}: {name}.weight has non-finite values")

    sae = TopKSAE(d_model, d_sae, k, norm_factor=s_in, hook_point=hook_point, dtype=dtype)
    with torch.no_grad():
        sae.W_enc.copy_(w_enc * (r * col_norm)[:, None])
        sae.b_enc.copy_(b_enc * (r * col_norm))
        sae.W_dec.copy_(w_dec / col_norm)
        sae.b_dec.copy_(b_dec * r)
    sae.extra = {
        **{key: v for key, v in raw.items() if key not in READ_KEYS},
        "layer": resid_post_layer(hook_point),
        "source_format": "llama-scope",
        "release_top_k": raw.get("top_k"),
        # In our pre-activation units: pre > this is the release's JumpReLU gate (module doc).
        "release_jump_relu_threshold": s_in * float(threshold),
    }
    return sae


def load_llama_scope(
    folder: str | Path,
    layer: int,
    k: int,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> TopKSAE:
    """Load a release layer folder (or one of ours) for `layer` as a TopK SAE with `k` latents."""
    folder = Path(folder)
    raw = read_hyperparams(folder)
    hp_path = folder / HYPERPARAMS_FILE
    hook_point = check_hook_points(raw, hp_path, layer)
    if not is_release_format(raw):
        return TopKSAE.load(folder, device=device, k=k, dtype=dtype)
    d_model, d_sae = positive_int(raw, "d_model", hp_path), positive_int(raw, "d_sae", hp_path)
    tensors = read_tensors(folder / WEIGHTS_FILE, d_model, d_sae)
    sae = convert_release(raw, tensors, hp_path, k=k, hook_point=hook_point, dtype=dtype)
    return sae.to(device)


def convert_llama_scope(src: str | Path, dst: str | Path, layer: int, k: int) -> TopKSAE:
    """Convert a release layer folder once and save it in our layout at `dst`."""
    sae = load_llama_scope(src, layer, k)
    sae.save(dst)
    return sae


def release_layer_folder(repo_id: str, layer: int) -> str:
    """Layer folder name inside a release repo: `...-LXR-8x` -> `...-L{layer}R-8x`."""
    name = repo_id.rsplit("/", 1)[-1]
    if "-LX" not in name:
        raise ValueError(f"cannot derive a layer folder from repo id {repo_id!r} (no '-LX')")
    return name.replace("-LX", f"-L{layer}", 1)


def snapshot_layer(repo_id: str, layer: int, *, revision: str | None = None) -> Path:
    """Download only one layer's folder of a release from the Hub; returns its local path."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError as e:
        raise RuntimeError("huggingface_hub is needed to fetch Llama-Scope SAEs by id") from e
    name = release_layer_folder(repo_id, layer)
    root = snapshot_download(
        repo_id,
        revision=revision,
        allow_patterns=[f"{name}/{HYPERPARAMS_FILE}", f"{name}/{WEIGHTS_FILE}"],
    )
    return Path(root) / name
