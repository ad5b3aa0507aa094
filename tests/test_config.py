import copy
import subprocess
import sys

import pytest
import yaml
from vlmdiff.config import ConfigError, load_schema, validate_config


@pytest.fixture(scope="module")
def schema(root):
    return load_schema(root / "schemas/config.schema.yaml")


@pytest.mark.parametrize("name", ["config.yaml", "presets/tiny.yaml", "presets/long.yaml"])
def test_presets_validate(root, schema, name):
    cfg = yaml.safe_load((root / name).read_text())
    validate_config(cfg, schema)
    assert cfg["lm"]["train"]["grad_clip"] == 1.0  # default filled through $ref


def test_long_preset_changes_only_data_and_stage2_steps(root, schema):
    """Merged over config.yaml (as `--configfile` does), the long preset keeps the default recipe."""
    from snakemake.utils import update_config

    base = yaml.safe_load((root / "config.yaml").read_text())
    merged = copy.deepcopy(base)
    update_config(merged, yaml.safe_load((root / "presets/long.yaml").read_text()))
    validate_config(merged, schema)
    validate_config(base, schema)
    assert merged["run"] == "long"
    assert merged["world"]["sizes"]["train"] > base["world"]["sizes"]["train"]
    assert merged["vlm"]["stage2"]["steps"] > base["vlm"]["stage2"]["steps"]
    # undo the preset's own keys: every other key of every section must be the default's
    merged["run"] = base["run"]
    merged["world"]["sizes"]["train"] = base["world"]["sizes"]["train"]
    for key in ("steps", "log_every"):
        merged["vlm"]["stage2"][key] = base["vlm"]["stage2"][key]
    assert merged == base


def test_empty_config_gets_every_default(schema):
    cfg: dict = {}
    validate_config(cfg, schema)
    assert cfg["run"] == "default"
    assert cfg["world"]["scene"]["image_size"] == 48
    assert cfg["vlm"]["stage1"]["train_vision"] is True


def _error(cfg, schema) -> str:
    with pytest.raises(ConfigError) as exc:
        validate_config(cfg, schema)
    return str(exc.value)


def test_unknown_key_is_named(root, schema):
    cfg = yaml.safe_load((root / "config.yaml").read_text())
    cfg["lm"]["hiden_size"] = 64
    msg = _error(cfg, schema)
    assert "lm.hiden_size" in msg and "hidden_size" in msg


def test_unknown_top_level_key(schema):
    assert "colour_palette" in _error({"colour_palette": 3}, schema)


def test_wrong_type_is_named(root, schema):
    cfg = yaml.safe_load((root / "config.yaml").read_text())
    cfg["vlm"]["stage2"]["steps"] = "many"
    assert "vlm.stage2.steps" in _error(copy.deepcopy(cfg), schema)


def test_command_line_strings_are_read_as_yaml(schema):
    # what `snakemake --config lm='{num_layers: 12}' features='{eps: 1e-4}'` hands over
    cfg = {"lm": {"num_layers": "12"}, "features": {"eps": "1e-4"}, "vlm": {"stage1": {"train_vision": "false"}}}
    validate_config(cfg, schema)
    assert cfg["lm"]["num_layers"] == 12 and cfg["features"]["eps"] == 1e-4
    assert cfg["vlm"]["stage1"]["train_vision"] is False
    assert "lm.num_layers" in _error({"lm": {"num_layers": "twelve"}}, schema)
    validate_config(cfg := {"run": "123"}, schema)
    assert cfg["run"] == "123"  # string keys stay strings


def test_bad_value_is_named(schema):
    assert "device" in _error({"device": "gpu-please"}, schema)
    assert "run" in _error({"run": "has space"}, schema)


def test_missing_path_is_named(schema, tmp_path):
    msg = _error({"world": {"scene": {"font": str(tmp_path / "nope.ttf")}}}, schema)
    assert "world.scene.font" in msg and "nope.ttf" in msg
    font = tmp_path / "font.ttf"
    font.write_bytes(b"")
    validate_config({"world": {"scene": {"font": str(font)}}}, schema)


def test_snakemake_stops_before_any_job(root, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("lm:\n  num_layerz: 3\n")
    proc = subprocess.run(
        [sys.executable, "-m", "snakemake", "-n", "--cores", "1", "--configfile", str(bad),
         "-s", str(root / "Snakefile"), "--directory", str(tmp_path)],
        capture_output=True, text=True,
    )
    assert proc.returncode != 0
    assert "lm.num_layerz" in proc.stdout + proc.stderr
    assert not (tmp_path / "results").exists()
