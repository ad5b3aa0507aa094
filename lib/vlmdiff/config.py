"""Config validation: JSON schema with defaults, plus checks the schema cannot express."""

from __future__ import annotations

import copy
from collections.abc import Mapping, MutableMapping
from pathlib import Path
from typing import Any

import jsonschema
import yaml


class ConfigError(ValueError):
    """A config value is wrong; the message names the key."""


def load_schema(path: Path) -> dict[str, Any]:
    with open(path) as fh:
        return yaml.safe_load(fh)


def validate_config(config: MutableMapping[str, Any], schema: Mapping[str, Any]) -> None:
    """Fill defaults into `config` in place, then raise ConfigError naming the first bad key."""
    _fill_defaults(config, schema)
    validator = jsonschema.Draft202012Validator(schema)
    errors = sorted(validator.iter_errors(config), key=lambda e: list(e.absolute_path))
    if errors:
        err = errors[0]
        key = ".".join(str(p) for p in err.absolute_path) or "<top level>"
        if err.validator == "additionalProperties":
            allowed = sorted(err.schema.get("properties", {}))
            extra = sorted(set(err.instance) - set(allowed))
            where = f"{key}." if err.absolute_path else ""
            raise ConfigError(
                f"unknown config key(s) {', '.join(where + e for e in extra)}; "
                f"allowed here: {', '.join(allowed)}"
            )
        raise ConfigError(f"config key '{key}': {err.message}")
    _check_paths(config, schema, ())


def _fill_defaults(
    config: MutableMapping[str, Any], schema: Mapping[str, Any], root: Mapping[str, Any] | None = None
) -> None:
    root = schema if root is None else root
    for name, sub in _resolve(schema, root).get("properties", {}).items():
        sub = _resolve(sub, root)
        if name not in config and "default" in sub:
            config[name] = copy.deepcopy(sub["default"])
        if isinstance(config.get(name), str) and _non_string(sub):
            # `snakemake --config lm='{num_layers: 12}'` passes nested values on as strings
            config[name] = _parse(config[name])
        if isinstance(config.get(name), MutableMapping) and "properties" in sub:
            _fill_defaults(config[name], sub, root)


def _non_string(schema: Mapping[str, Any]) -> bool:
    types = schema.get("type")
    types = [types] if isinstance(types, str) else types or []
    return bool(types) and "string" not in types


def _parse(text: str) -> Any:
    """A command-line string as YAML; `1e-4` too, which YAML 1.1 leaves a string."""
    value = yaml.safe_load(text)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return text
    return value


def _resolve(schema: Mapping[str, Any], root: Mapping[str, Any]) -> dict[str, Any]:
    """Merge local `$ref: "#/$defs/x"` and `allOf` parts into one schema (enough for ours)."""
    merged: dict[str, Any] = {}
    parts = [schema.get("$ref")] + list(schema.get("allOf", []))
    for part in parts:
        if part is None:
            continue
        if isinstance(part, str):
            part = root["$defs"][part.rsplit("/", 1)[-1]]
        part = _resolve(part, root)
        merged.update({k: v for k, v in part.items() if k != "properties"})
        merged.setdefault("properties", {}).update(part.get("properties", {}))
    props = {**merged.get("properties", {}), **schema.get("properties", {})}
    merged.update({k: v for k, v in schema.items() if k not in ("$ref", "allOf", "properties")})
    if props:
        merged["properties"] = props
    return merged


def _check_paths(config: Any, schema: Mapping[str, Any], where: tuple[str, ...]) -> None:
    """Keys marked `x-path: true` in the schema must name an existing file or folder."""
    if schema.get("x-path") and isinstance(config, str) and config:
        if not Path(config).exists():
            raise ConfigError(f"config key '{'.'.join(where)}': path does not exist: {config}")
        return
    if isinstance(config, Mapping):
        for name, sub in schema.get("properties", {}).items():
            if name in config:
                _check_paths(config[name], sub, (*where, name))
