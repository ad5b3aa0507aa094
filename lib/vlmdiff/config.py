"""Config validation: JSON schema with defaults, plus checks the schema cannot express.

The schema (schemas/config.schema.yaml) is the one place where every key's default, range and
meaning is written down; config.yaml holds only what differs, and a preset (`--configfile`) is
merged over it. To see the whole config a run gets, defaults filled in:

    python -m vlmdiff.config                              # config.yaml alone
    python -m vlmdiff.config --configfile presets/tiny.yaml

Library code that takes one section of the config (`WorldConfig`, `OptimConfig`, `TrainConfig`)
checks and fills it through `section` / `build`, so it never carries defaults or checks of its own.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import functools
import sys
from collections.abc import Mapping, MutableMapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import jsonschema
import yaml

# Like the workflow (`workflow.basedir`), found from the checkout this package lives in.
ROOT = Path(__file__).resolve().parents[2]
SCHEMA_FILE = ROOT / "schemas" / "config.schema.yaml"
CONFIG_FILE = ROOT / "config.yaml"

T = TypeVar("T")


class ConfigError(ValueError):
    """A config value is wrong; the message names the key."""


def load_schema(path: Path = SCHEMA_FILE) -> dict[str, Any]:
    with open(path) as fh:
        return yaml.safe_load(fh)


@functools.cache
def schema() -> dict[str, Any]:
    """The workflow's schema, read once."""
    if not SCHEMA_FILE.is_file():
        raise FileNotFoundError(
            f"{SCHEMA_FILE} not found: vlmdiff reads the config schema from its checkout "
            "(install it with `pip install -e .`)"
        )
    return load_schema(SCHEMA_FILE)


def validate_config(config: MutableMapping[str, Any], schema: Mapping[str, Any]) -> None:
    """Fill defaults into `config` in place, then raise ConfigError naming the first bad key."""
    _validate(config, schema, jsonschema.Draft202012Validator(schema), ())


def section(where: str, values: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """A copy of `values` checked against the schema's `where` section (e.g. "world.scene"),
    with its defaults filled in; a ConfigError names the key in full (world.scene.max_objects)."""
    sub, validator = _section(where)
    config = copy.deepcopy(dict(values or {}))
    _validate(config, sub, validator, tuple(where.split(".")))
    return config


def build(cls: type[T], where: str, values: Mapping[str, Any] | None = None, **extra: Any) -> T:
    """The dataclass `cls` from the section `where` (see `section`): numbers and lists typed as
    the schema says (integer -> int, number -> float, array -> tuple). Keys of the section that
    are not fields are left out; `extra` gives fields the section does not hold."""
    config = section(where, values)
    sub, _ = _section(where)
    names = {f.name for f in dataclasses.fields(cls)}
    props = _resolve(sub, sub).get("properties", {})
    typed = {k: _typed(v, props[k], sub) for k, v in config.items() if k in names}
    return cls(**typed, **extra)


def merged_config(configfiles: Sequence[str | Path] = (), base: Path = CONFIG_FILE) -> dict[str, Any]:
    """What a run gets: config.yaml, each `--configfile` merged over it (as Snakemake does), then
    checked with the schema's defaults filled in."""
    from snakemake.utils import update_config

    config = yaml.safe_load(Path(base).read_text()) or {}
    for path in configfiles:
        update_config(config, yaml.safe_load(Path(path).read_text()) or {})
    validate_config(config, schema())
    return config


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        prog="python -m vlmdiff.config",
        description="Print the whole config a run gets (config.yaml, the presets merged over it "
        "in order, every default filled in from schemas/config.schema.yaml) as YAML.",
    )
    ap.add_argument("--configfile", nargs="+", default=[], metavar="PRESET",
                    help="preset(s) merged over config.yaml, as with snakemake --configfile")
    args = ap.parse_args(argv)
    try:
        config = merged_config(args.configfile)
    except ConfigError as err:
        sys.exit(f"invalid config: {err}")
    yaml.safe_dump(config, sys.stdout, sort_keys=False, allow_unicode=True, width=100)


def _validate(
    config: MutableMapping[str, Any],
    schema: Mapping[str, Any],
    validator: jsonschema.Validator,
    where: tuple[str, ...],
) -> None:
    _fill_defaults(config, schema)
    # the first bad key; at one place, wrong or unknown keys before missing ones
    errors = sorted(
        (e for e in validator.iter_errors(config) if not _spurious(e, schema)),
        key=lambda e: (list(e.absolute_path), e.validator == "required"),
    )
    if errors:
        err = errors[0]
        inner = [e for e in err.context if e.validator != "type"]
        if err.validator == "anyOf" and inner:
            # "null or a section": the section's own complaint names the key
            err = max(inner, key=lambda e: len(e.absolute_path))
        path = [*where, *(str(p) for p in err.absolute_path)]
        key = ".".join(path) or "<top level>"
        if err.validator in ("additionalProperties", "unevaluatedProperties"):
            allowed = _allowed(err, schema)
            extra = sorted(set(err.instance) - set(allowed))
            prefix = f"{key}." if path else ""
            raise ConfigError(
                f"unknown config key(s) {', '.join(prefix + e for e in extra)}; "
                f"allowed here: {', '.join(allowed)}"
            )
        if err.validator == "required":
            missing = [n for n in err.validator_value if n not in err.instance]
            key = ".".join([*path, missing[0]])
            raise ConfigError(f"config key '{key}' must be given (it has no default)")
        raise ConfigError(f"config key '{key}': {err.message}")
    _check_paths(config, schema, where)


def _allowed(err: jsonschema.ValidationError, root: Mapping[str, Any]) -> list[str]:
    return sorted(_resolve(err.schema, root).get("properties", {}))


def _spurious(err: jsonschema.ValidationError, root: Mapping[str, Any]) -> bool:
    """`unevaluatedProperties` also flags a known key whose value is wrong (a failed `allOf`
    part evaluates nothing); that key's own error is the one to report."""
    return err.validator == "unevaluatedProperties" and not set(err.instance) - set(
        _allowed(err, root)
    )


@functools.cache
def _section(where: str) -> tuple[dict[str, Any], jsonschema.Validator]:
    root = schema()
    sub: Mapping[str, Any] = root
    for name in where.split("."):
        props = _resolve(sub, root).get("properties", {})
        if name not in props:
            raise KeyError(f"the config schema has no section {where!r}")
        sub = props[name]
    # the section as a schema of its own, with the definitions its references point to
    sub = {**sub, "$defs": root.get("$defs", {})}
    return sub, jsonschema.Draft202012Validator(sub)


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


def _types(schema: Mapping[str, Any]) -> list[str]:
    types = schema.get("type")
    return [types] if isinstance(types, str) else list(types or [])


def _non_string(schema: Mapping[str, Any]) -> bool:
    types = _types(schema)
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


def _typed(value: Any, schema: Mapping[str, Any], root: Mapping[str, Any]) -> Any:
    schema = _resolve(schema, root)
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, Mapping):
        props = schema.get("properties", {})
        return {k: _typed(v, props.get(k, {}), root) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return tuple(_typed(v, schema.get("items", {}), root) for v in value)
    types = _types(schema)
    if "integer" in types:
        return int(value)
    if "number" in types:
        return float(value)
    return value


def _resolve(schema: Mapping[str, Any], root: Mapping[str, Any]) -> dict[str, Any]:
    """Merge local `$ref: "#/$defs/x"` and `allOf` parts into one schema (enough for ours); a
    property named in several parts merges too (a section may set a shared key's default)."""
    merged: dict[str, Any] = {}
    props: dict[str, Any] = {}
    parts = [schema.get("$ref")] + list(schema.get("allOf", []))
    for part in parts:
        if part is None:
            continue
        if isinstance(part, str):
            part = root["$defs"][part.rsplit("/", 1)[-1]]
        part = _resolve(part, root)
        merged.update({k: v for k, v in part.items() if k != "properties"})
        for name, sub in part.get("properties", {}).items():
            props[name] = {**props.get(name, {}), **sub}
    for name, sub in schema.get("properties", {}).items():
        props[name] = {**props.get(name, {}), **sub}
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


if __name__ == "__main__":
    main()
