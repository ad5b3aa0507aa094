"""Our SAEs in the on-disk formats of SAELens (>= 6) and sparsify (>= 1.3), loadable by their own
`SAE.load_from_disk` and `SparseCoder.load_from_disk`.

Ours: `pre = ReLU(W_enc (s x) + b_enc)`, top-k, `x_hat = (W_dec f + b_dec) / s`, with the input
scale `s = sqrt(d_model) / mean ||x||`. Neither library applies a dataset-wise scalar in this
form, so `s` is folded into the weights: `W_enc' = s W_enc`, `W_dec' = W_dec / s`,
`b_dec' = b_dec / s`, `b_enc` unchanged. Then `W_enc' x + b_enc` is our pre-activation and
`W_dec' f + b_dec'` our reconstruction, in model units, for the same codes `f`. sparsify
subtracts `b_dec'` from the input before encoding, which its encoder bias absorbs:
`b_enc + W_enc' b_dec'`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor

from vlmdiff.files import atomic_dir
from vlmdiff.logs import Log
from vlmdiff.sae.folder import resid_post_layer
from vlmdiff.sae.topk import TopKSAE

SAELENS_CONFIG = "cfg.json"
SAELENS_WEIGHTS = "sae_weights.safetensors"
SPARSIFY_CONFIG = "cfg.json"
SPARSIFY_WEIGHTS = "sae.safetensors"
SAELENS_FORMAT_VERSION = "6.0.0"
"""The SAELens release whose `cfg.json` layout we write; SAELens reads >= 6 configs as they are."""

ARCHITECTURES = ("topk", "jumprelu")
JUMPRELU_KEY = "release_jump_relu_threshold"
"""Where a converted Llama-Scope layer keeps the release's JumpReLU gate, in our units."""


class ExportError(ValueError):
    """An SAE that cannot be written in the requested format."""


@dataclass(frozen=True)
class Folded:
    """An SAE with its input scale folded in, float64, in model units."""

    w_enc: Tensor
    """`[d_sae, d_model]`: `s W_enc`."""
    b_enc: Tensor
    """`[d_sae]`."""
    w_dec: Tensor
    """`[d_model, d_sae]`: `W_dec / s`."""
    b_dec: Tensor
    """`[d_model]`: `b_dec / s`."""


def fold_scale(sae: TopKSAE) -> Folded:
    """Our SAE with `s` folded into the weights (module doc), computed in float64."""
    s = float(sae.norm_factor)
    return Folded(
        w_enc=sae.W_enc.detach().cpu().double() * s,
        b_enc=sae.b_enc.detach().cpu().double(),
        w_dec=sae.W_dec.detach().cpu().double() / s,
        b_dec=sae.b_dec.detach().cpu().double() / s,
    )


def hook_layer(sae: TopKSAE, source: str) -> int:
    """Layer L of the SAE's `blocks.L.hook_resid_post` hook point; `source` names the folder."""
    layer = resid_post_layer(sae.hook_point)
    if layer is None:
        raise ExportError(
            f"{source}: hook point {sae.hook_point!r} is not 'blocks.L.hook_resid_post'"
        )
    return layer


def jumprelu_threshold(sae: TopKSAE, source: str) -> float:
    """The release's JumpReLU gate on our pre-activations, as a converted layer stores it."""
    if sae.extra.get("source_format") != "llama-scope" or JUMPRELU_KEY not in sae.extra:
        raise ExportError(
            f"{source}: no {JUMPRELU_KEY!r} in hyperparams.json; only base SAEs imported from "
            "a Llama-Scope release have a JumpReLU to export"
        )
    value = sae.extra[JUMPRELU_KEY]
    if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
        raise ExportError(f"{source}: {JUMPRELU_KEY} must be a number >= 0, got {value!r}")
    return float(value)


def saelens_files(
    sae: TopKSAE,
    *,
    architecture: str = "topk",
    model_name: str | None = None,
    source: str = "SAE",
) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """`cfg.json` and `sae_weights.safetensors` contents: `W_enc [d_in, d_sae]`,
    `W_dec [d_sae, d_in]`, `b_enc`, `b_dec` (and `threshold` for `jumprelu`), float32."""
    if architecture not in ARCHITECTURES:
        raise ExportError(f"{source}: architecture {architecture!r} is not one of {ARCHITECTURES}")
    f = fold_scale(sae)
    tensors = {"W_enc": f.w_enc.T, "W_dec": f.w_dec.T, "b_enc": f.b_enc, "b_dec": f.b_dec}
    cfg: dict[str, Any] = {
        "architecture": architecture,
        "d_in": sae.d_model,
        "d_sae": sae.d_sae,
        "dtype": "float32",
        "device": "cpu",
        # ours encodes x itself, not x - b_dec
        "apply_b_dec_to_input": False,
        # the input scale is in the weights
        "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": {
            "sae_lens_version": SAELENS_FORMAT_VERSION,
            "sae_lens_training_version": None,
            "hook_name": f"blocks.{hook_layer(sae, source)}.hook_resid_post",
            "model_name": model_name,
            "vlmdiff_norm_factor": float(sae.norm_factor),
            "vlmdiff_k": sae.k,
        },
    }
    if architecture == "topk":
        cfg["k"] = sae.k
        cfg["rescale_acts_by_decoder_norm"] = False
    else:
        threshold = jumprelu_threshold(sae, source)
        tensors["threshold"] = torch.full((sae.d_sae,), threshold, dtype=torch.float64)
        cfg["metadata"]["release_jump_relu_threshold"] = threshold
    return cfg, _float32(tensors)


def sparsify_files(sae: TopKSAE) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """`cfg.json` and `sae.safetensors` contents: `encoder.weight [d_sae, d_in]`,
    `encoder.bias`, `W_dec [d_sae, d_in]`, `b_dec`, float32."""
    f = fold_scale(sae)
    tensors = {
        "encoder.weight": f.w_enc,
        # sparsify encodes x - b_dec; adding W_enc' b_dec' back keeps our pre-activations
        "encoder.bias": f.b_enc + f.w_enc @ f.b_dec,
        "W_dec": f.w_dec.T,
        "b_dec": f.b_dec,
    }
    cfg = {
        "activation": "topk",
        "expansion_factor": max(sae.d_sae // sae.d_model, 1),
        # the decoder columns are unit norm divided by s; renormalising them would undo the fold
        "normalize_decoder": False,
        "num_latents": sae.d_sae,
        "k": sae.k,
        "multi_topk": False,
        "skip_connection": False,
        "transcode": False,
        "d_in": sae.d_model,
    }
    return cfg, _float32(tensors)


def _float32(tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
    return {name: t.float().contiguous() for name, t in tensors.items()}


def write_format(
    folder: Path, cfg: Mapping[str, Any], tensors: Mapping[str, Tensor], weights_name: str
) -> int:
    """`cfg.json` and the weights file in `folder` (created); returns the bytes written."""
    folder.mkdir(parents=True, exist_ok=True)
    save_file(dict(tensors), str(folder / weights_name), metadata={"format": "pt"})
    (folder / "cfg.json").write_text(json.dumps(cfg, indent=2) + "\n")
    return sum(p.stat().st_size for p in folder.iterdir())


def saelens_name(layer: int) -> str:
    """Folder of one layer in a SAELens export: its hook name."""
    return f"blocks.{layer}.hook_resid_post"


def sparsify_name(layer: int) -> str:
    """Folder of one layer in a sparsify export: its hookpoint, the output of decoder block L."""
    return f"layers.{layer}"


def export_sae(
    sae: TopKSAE,
    root: str | Path,
    *,
    jumprelu: bool = False,
    model_name: str | None = None,
    source: str = "SAE",
) -> dict[str, int]:
    """Write `sae` under `root` as `saelens/blocks.L.hook_resid_post/`, `sparsify/layers.L/`
    and, with `jumprelu`, `saelens_jumprelu/blocks.L.hook_resid_post/`; bytes per format."""
    root = Path(root)
    layer = hook_layer(sae, source)
    cfg, tensors = saelens_files(sae, model_name=model_name, source=source)
    sizes = {"saelens": write_format(root / "saelens" / saelens_name(layer), cfg, tensors,
                                     SAELENS_WEIGHTS)}
    cfg, tensors = sparsify_files(sae)
    sizes["sparsify"] = write_format(root / "sparsify" / sparsify_name(layer), cfg, tensors,
                                     SPARSIFY_WEIGHTS)
    if jumprelu:
        cfg, tensors = saelens_files(sae, architecture="jumprelu", model_name=model_name,
                                     source=source)
        sizes["saelens_jumprelu"] = write_format(
            root / "saelens_jumprelu" / saelens_name(layer), cfg, tensors, SAELENS_WEIGHTS
        )
    return sizes


def export_saes_job(
    *,
    layers: Sequence[int],
    sae_dirs: Sequence[str | Path],
    jumprelu: bool,
    model_name: str | None,
    out: Mapping[str, str | Path],
    log: Log = print,
) -> dict[int, dict[str, int]]:
    """The `export_saes` rule: every layer's SAE of one regime (`sae_dirs`, in `layers` order)
    exported into the folder `out["exports"]`, replaced whole; sizes logged."""
    sizes = {}
    with atomic_dir(out["exports"]) as tmp:
        for layer, folder in zip(layers, sae_dirs, strict=True):
            sae = TopKSAE.load(folder)
            found = hook_layer(sae, f"{folder}/hyperparams.json")
            if found != layer:
                raise ExportError(
                    f"{folder}/hyperparams.json: hook point is layer {found}, expected {layer}"
                )
            sizes[layer] = export_sae(sae, tmp, jumprelu=jumprelu, model_name=model_name,
                                      source=f"{folder}/hyperparams.json")
            mib = {k: round(v / 2**20, 2) for k, v in sizes[layer].items()}
            log(f"layer {layer}: {folder} exported (MiB: {mib})")
    return sizes
