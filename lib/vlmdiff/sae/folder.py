"""An SAE folder on disk, in the Llama-Scope layout: `hyperparams.json` and
`checkpoints/final.safetensors`. Names, keys, the parsing of a release's hyperparams and the
checked reading of its tensors; `vlmdiff.sae.topk.TopKSAE` saves and loads through these.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from safetensors import safe_open
from torch import Tensor

HYPERPARAMS_FILE = "hyperparams.json"
WEIGHTS_FILE = "checkpoints/final.safetensors"

# Keys of hyperparams.json that `save` writes itself; `extra` may not override them.
LAYOUT_KEYS = frozenset(
    {
        "d_model",
        "d_sae",
        "act_fn",
        "top_k",
        "norm_activation",
        "dataset_average_activation_norm",
        "hook_point_in",
        "hook_point_out",
        "use_decoder_bias",
        "apply_decoder_bias_to_pre_encoder",
        "sparsity_include_decoder_norm",
        "expansion_factor",
    }
)
# Keys of a hyperparams.json (ours or a Llama-Scope release's) that loading interprets; the
# rest pass into `extra`.
READ_KEYS = LAYOUT_KEYS | {"jump_relu_threshold"}


class SAEFormatError(ValueError):
    """An SAE folder whose hyperparams or tensors do not fit the expected layout."""


def required(raw: dict[str, Any], key: str, source: Path) -> Any:
    """`raw[key]`, or an error naming the file and the key."""
    if key not in raw:
        raise SAEFormatError(f"{source}: key {key!r} is missing")
    return raw[key]


def positive_int(raw: dict[str, Any], key: str, source: Path) -> int:
    """`raw[key]` as a positive integer, or an error naming the file and the key."""
    value = required(raw, key, source)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise SAEFormatError(f"{source}: {key!r} must be a positive integer, got {value!r}")
    return value


@dataclass
class SAESpec:
    """What `TopKSAE.load` needs from a hyperparams.json, whatever release wrote it."""

    d_model: int
    d_sae: int
    k: int
    norm_factor: float
    hook_point: str | None
    fold_decoder_norm: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


def parse_hyperparams(raw: dict[str, Any], source: Path, *, k: int | None = None) -> SAESpec:
    """Interpret a hyperparams.json dict; the one place that knows the releases' conventions.

    Ours: `act_fn: "topk"`. Llama-Scope: `act_fn: "jumprelu"` is re-instantiated as TopK with
    `k` (or its stored `top_k`), dropping the JumpReLU threshold, and with
    `sparsity_include_decoder_norm` the decoder column norms are folded into the encoder.
    """
    d_model, d_sae = positive_int(raw, "d_model", source), positive_int(raw, "d_sae", source)

    act_fn = required(raw, "act_fn", source)
    if act_fn not in ("topk", "jumprelu"):
        raise SAEFormatError(f"{source}: act_fn {act_fn!r} is not supported (topk, jumprelu)")
    if k is None:
        if "top_k" not in raw:
            raise SAEFormatError(f"{source}: key 'top_k' is missing; pass k= to choose one")
        k = positive_int(raw, "top_k", source)
    if not 0 < k <= d_sae:
        raise SAEFormatError(f"{source}: k={k} is outside [1, d_sae={d_sae}]")

    n_in, n_out = dataset_norms(raw, source, d_model)
    # One scalar serves both sides; true for resid_post -> resid_post SAEs.
    if not math.isclose(n_in, n_out, rel_tol=1e-5):
        raise SAEFormatError(
            f"{source}: dataset_average_activation_norm in={n_in} != out={n_out}; "
            "SAEs with different input and output norms are not supported"
        )
    norm_factor = math.sqrt(d_model) / n_in  # 1.0 without normalisation

    if raw.get("apply_decoder_bias_to_pre_encoder", False):
        raise SAEFormatError(f"{source}: apply_decoder_bias_to_pre_encoder=true is not supported")
    hook_in, hook_out = (
        raw.get("hook_point_in"),
        raw.get("hook_point_out", raw.get("hook_point_in")),
    )
    if hook_in != hook_out:
        raise SAEFormatError(f"{source}: hook_point_in {hook_in!r} != hook_point_out {hook_out!r}")

    return SAESpec(
        d_model=d_model,
        d_sae=d_sae,
        k=k,
        norm_factor=norm_factor,
        hook_point=hook_in,
        fold_decoder_norm=bool(raw.get("sparsity_include_decoder_norm", False)),
        extra={key: v for key, v in raw.items() if key not in READ_KEYS},
    )


def dataset_norms(raw: dict[str, Any], source: Path, d_model: int) -> tuple[float, float]:
    """The (in, out) dataset-average activation norms; sqrt(d_model) without normalisation."""
    norm = raw.get("norm_activation", "none")
    if norm == "none":
        return math.sqrt(d_model), math.sqrt(d_model)
    if norm != "dataset-wise":
        raise SAEFormatError(
            f"{source}: norm_activation {norm!r} is not supported (dataset-wise, none)"
        )
    norms = required(raw, "dataset_average_activation_norm", source)
    try:
        n_in, n_out = float(norms["in"]), float(norms["out"])
    except (TypeError, KeyError, ValueError) as e:
        raise SAEFormatError(
            f"{source}: 'dataset_average_activation_norm' needs numbers 'in' and 'out', "
            f"got {norms!r}"
        ) from e
    for name, value in (("in", n_in), ("out", n_out)):
        if not (value > 0 and math.isfinite(value)):
            raise SAEFormatError(f"{source}: dataset_average_activation_norm.{name}={value}")
    return n_in, n_out


def read_tensors(path: Path, d_model: int, d_sae: int) -> dict[str, Tensor]:
    """The four layout tensors as float32, each checked against the hyperparams' shapes."""
    expected = {
        "encoder.weight": (d_sae, d_model),
        "encoder.bias": (d_sae,),
        "decoder.weight": (d_model, d_sae),
        "decoder.bias": (d_model,),
    }
    if not path.is_file():
        raise FileNotFoundError(f"SAE weights {path} are missing")
    out = {}
    try:
        handle = safe_open(str(path), framework="pt", device="cpu")
    except Exception as e:  # safetensors raises its own error type for a bad header
        raise SAEFormatError(f"{path}: not a readable safetensors file ({e})") from e
    with handle as f:
        present = set(f.keys())
        for name, shape in expected.items():
            if name not in present:
                raise SAEFormatError(f"{path}: tensor {name!r} is missing (has {sorted(present)})")
            t = f.get_tensor(name)
            if tuple(t.shape) != shape:
                raise SAEFormatError(
                    f"{path}: tensor {name!r} has shape {tuple(t.shape)}, but hyperparams.json "
                    f"(d_model={d_model}, d_sae={d_sae}) implies {shape}"
                )
            out[name] = t.float()
    return out


_RESID_POST = re.compile(r"^blocks\.(\d+)\.hook_resid_post$")


def resid_post_layer(hook_point: Any) -> int | None:
    """L of a `blocks.L.hook_resid_post` hook point (our cache's `layer_L`); None otherwise."""
    match = _RESID_POST.match(hook_point) if isinstance(hook_point, str) else None
    return int(match.group(1)) if match else None
