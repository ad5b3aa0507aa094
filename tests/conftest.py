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
    from snakemake.utils import update_config
    from vlmdiff.config import load_schema, validate_config

    base = yaml.safe_load((ROOT / "config.yaml").read_text())
    update_config(base, yaml.safe_load((ROOT / "presets/tiny.yaml").read_text()))
    validate_config(base, load_schema(ROOT / "schemas/config.schema.yaml"))
    return base

