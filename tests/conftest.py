from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def root() -> Path:
    return ROOT


@pytest.fixture(scope="session")
def tiny_config() -> dict:
    """presets/tiny.yaml merged over config.yaml, as `snakemake --configfile` does."""
    from vlmdiff.config import load_schema, validate_config

    base = yaml.safe_load((ROOT / "config.yaml").read_text())
    _update(base, yaml.safe_load((ROOT / "presets/tiny.yaml").read_text()))
    validate_config(base, load_schema(ROOT / "schemas/config.schema.yaml"))
    return base


def _update(base: dict, new: dict) -> None:
    for k, v in new.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            _update(base[k], v)
        else:
            base[k] = v
