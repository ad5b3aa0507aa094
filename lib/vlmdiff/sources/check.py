"""The paper preset's external sources (VLM, base LM, Llama-Scope SAEs): where they are and
whether they fit together, checked from their small JSON files before any heavy job runs."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from vlmdiff.logs import Log
from vlmdiff.sources.llama_scope import hook_point_layer
from vlmdiff.sources.llava_more import is_hub_id, model_format, read_json, text_dims

SOURCE_KEYS = ("vlm", "vlm_stage1", "lm", "vision_tower", "llama_scope")


class SourceMismatch(ValueError):
    """The model and the SAEs (or the config) disagree; the message names both sides."""


def check_locations(source: Mapping[str, Any]) -> list[str]:
    """Problems with `source.*` locations: a value that is neither an existing path nor a Hub id."""
    problems = []
    for key in SOURCE_KEYS:
        value = source.get(key)
        if value and not Path(value).expanduser().exists() and not is_hub_id(value):
            problems.append(f"config key 'source.{key}': {value!r} is neither a local path nor a Hub id")
    for section, keys in (("vqav2", ("path",)), ("vsr", ("path", "coco_images"))):
        for key in keys:
            value = source.get(section, {}).get(key)
            if value and not Path(value).expanduser().exists() and (key == "coco_images" or not is_hub_id(value)):
                problems.append(f"config key 'source.{section}.{key}': {value!r} does not exist")
    return problems


def source_problems(source: Mapping[str, Any]) -> list[str]:
    """Problems with the `source` section: missing or wrong locations, and combinations of
    world, models and SAEs that cannot work together."""
    problems = check_locations(source)
    if source["world"] == "vqav2" and not (source["vqav2"]["path"] and source["vsr"]["path"]
                                          and source["vsr"]["coco_images"]):
        problems.append("source.world: vqav2 needs source.vqav2.path, source.vsr.path and "
                        "source.vsr.coco_images")
    if source["models"] == "import" and not source["vlm"]:
        problems.append("source.models: import needs source.vlm")
    if source["models"] == "train" and source["world"] != "shapes":
        problems.append("source.models: train works on the shapes world only; use import")
    if source["saes"] == "llama_scope" and not source["llama_scope"]:
        problems.append("source.saes: llama_scope needs source.llama_scope")
    if source["saes"] == "train" and source["models"] != "train":
        problems.append("source.saes: train needs the workflow's own LM (source.models: train)")
    return problems


def is_local(value: str | None) -> bool:
    return bool(value) and Path(str(value)).expanduser().exists()


def sae_layer_folder(root: Path, pattern: str, layer: int) -> Path:
    """A release layer folder: `root` itself if it holds `hyperparams.json`, else the pattern."""
    if (root / "hyperparams.json").is_file():
        return root
    return root / pattern.format(layer=layer)


def fetch_json(value: str, filename: str, key: str, revision: str | None = None) -> tuple[dict[str, Any], str]:
    """`filename` inside a local folder or a Hub repo (only that file is downloaded)."""
    if is_local(value):
        path = Path(value).expanduser() / filename
        return read_json(path), str(path)
    if not is_hub_id(value):
        raise FileNotFoundError(f"config key '{key}': {value!r} is neither a local path nor a Hub id")
    from huggingface_hub import hf_hub_download

    path = Path(hf_hub_download(value, filename, revision=revision))
    return read_json(path), f"{value}/{filename}"


def check_layer_count(
    vlm_config: Mapping[str, Any], vlm_name: str, config_layers: int
) -> tuple[int, int]:
    """(d_model, layers) of the model, which must have the config's `lm.num_layers`."""
    d_model, n_layers = text_dims(vlm_config)
    if n_layers != config_layers:
        raise SourceMismatch(
            f"the config has lm.num_layers={config_layers}, but the model {vlm_name} has "
            f"{n_layers} decoder layers (num_hidden_layers); set lm.num_layers: {n_layers}"
        )
    return d_model, n_layers


def check_compatibility(
    vlm_config: Mapping[str, Any],
    vlm_name: str,
    saes: Mapping[int, tuple[Mapping[str, Any], str]],
    layers: Sequence[int],
    config_layers: int,
) -> dict[str, Any]:
    """The VLM's language model against the config's layer count and each layer's SAE
    (d_model and hook point `blocks.L.hook_resid_post` = output of decoder block L)."""
    fmt = model_format(vlm_config)
    d_model, n_layers = check_layer_count(vlm_config, vlm_name, config_layers)
    for layer in layers:
        if layer not in saes:
            raise SourceMismatch(f"no SAE for layer {layer} of {vlm_name}")
        hp, where = saes[layer]
        if hp.get("d_model") != d_model:
            raise SourceMismatch(
                f"SAE {where} has d_model={hp.get('d_model')}, but the model {vlm_name} has "
                f"hidden_size={d_model}"
            )
        for key in ("hook_point_in", "hook_point_out"):
            found = hook_point_layer(hp.get(key), Path(where), key)
            if found != layer:
                raise SourceMismatch(
                    f"SAE {where} reads {hp.get(key)!r} (layer {found}), but it is wired to layer "
                    f"{layer} of {vlm_name} (output of decoder block {layer}, our cache's layer_{layer})"
                )
            if found >= n_layers:
                raise SourceMismatch(
                    f"SAE {where} hooks layer {found}, but the model {vlm_name} has only {n_layers} layers"
                )
    return {"vlm": vlm_name, "format": fmt, "d_model": d_model, "n_layers": n_layers,
            "sae_layers": sorted(saes), "sae_files": {str(k): v[1] for k, v in sorted(saes.items())}}


def check_sources(
    source: Mapping[str, Any], layers: Sequence[int], config_layers: int, *, local_only: bool = False
) -> dict[str, Any] | None:
    """Read the VLM's config.json and each layer's SAE hyperparams.json (downloading only those
    files for Hub ids) and check them; None when `local_only` and some source is on the Hub."""
    vlm = source.get("vlm")
    if not vlm:
        return None
    names = [vlm] + ([source["llama_scope"]] if source.get("saes") == "llama_scope" else [])
    if local_only and not all(is_local(n) for n in names):
        return None
    vlm_config, vlm_name = fetch_json(vlm, "config.json", "source.vlm", source.get("revision"))
    check_layer_count(vlm_config, vlm_name, config_layers)
    saes: dict[int, tuple[Mapping[str, Any], str]] = {}
    if source.get("saes") == "llama_scope":
        root, pattern = source["llama_scope"], source["llama_scope_layer_folder"]
        for layer in layers:
            if is_local(root):
                folder = sae_layer_folder(Path(root).expanduser(), pattern, layer)
                saes[layer] = (read_json(folder / "hyperparams.json"), str(folder / "hyperparams.json"))
            else:
                name = f"{pattern.format(layer=layer)}/hyperparams.json"
                saes[layer] = fetch_json(root, name, "source.llama_scope")
    else:
        d_model, _ = text_dims(vlm_config)
        hook = "blocks.{}.hook_resid_post"
        saes = {
            layer: ({"d_model": d_model, "hook_point_in": hook.format(layer),
                     "hook_point_out": hook.format(layer)}, "(trained by the workflow)")
            for layer in layers
        }
    return check_compatibility(vlm_config, vlm_name, saes, layers, config_layers)


def write_check(result: Mapping[str, Any], path: str | os.PathLike) -> None:
    from vlmdiff.world.datasets import write_json

    write_json(json.loads(json.dumps(result)), path)


def check_sources_job(
    *,
    source: Mapping[str, Any],
    layers: Sequence[int],
    config_layers: int,
    out: Mapping[str, str | os.PathLike],
    log: Log = print,
) -> dict[str, Any] | None:
    """The `check_sources` rule: `check_sources` (the Hub's JSON files fetched too), its result
    logged and written to `out["check"]`."""
    result = check_sources(source, layers, config_layers)
    log(f"sources fit: {result}")
    write_check(result, out["check"])
    return result


def import_base_sae_job(
    *,
    source: Mapping[str, Any],
    layer: int,
    k: int,
    out: Mapping[str, str | os.PathLike],
    log: Log = print,
) -> dict[str, Any]:
    """The `import_base_sae` rule: one layer's Llama-Scope SAE (local release folder or Hub id)
    saved as our TopK SAE in `out["sae"]`."""
    from vlmdiff.sources.llama_scope import convert_llama_scope, snapshot_layer

    dst = out["sae"]
    root, pattern = source["llama_scope"], source["llama_scope_layer_folder"]
    if is_local(root):
        folder = sae_layer_folder(Path(root).expanduser(), pattern, layer)
    else:
        folder = snapshot_layer(root, layer, revision=source.get("revision"))
    sae = convert_llama_scope(folder, dst, layer, k)
    log(f"layer {layer}: {folder} -> {dst} (d_model={sae.d_model}, d_sae={sae.d_sae}, k={k})")
    return {"layer": layer, "source": str(folder), "d_model": sae.d_model, "d_sae": sae.d_sae}
