import copy
import subprocess
import sys

import pytest
import yaml
from vlmdiff.config import ConfigError, load_schema, main, merged_config, section, validate_config


@pytest.fixture(scope="module")
def schema(root):
    return load_schema(root / "schemas/config.schema.yaml")


@pytest.mark.parametrize("name", ["config.yaml", "presets/tiny.yaml", "presets/long.yaml",
                                  "presets/spatial.yaml"])
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


def test_empty_config_gets_every_default(root, schema):
    cfg = yaml.safe_load((root / "config.yaml").read_text())  # `run` is its only key
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
    cfg.setdefault("lm", {})["hiden_size"] = 64
    msg = _error(cfg, schema)
    assert "lm.hiden_size" in msg and "hidden_size" in msg


def test_unknown_top_level_key(schema):
    assert "colour_palette" in _error({"colour_palette": 3}, schema)


def test_wrong_type_is_named(root, schema):
    cfg = yaml.safe_load((root / "config.yaml").read_text())
    cfg.setdefault("vlm", {}).setdefault("stage2", {})["steps"] = "many"
    assert "vlm.stage2.steps" in _error(copy.deepcopy(cfg), schema)


def test_command_line_strings_are_read_as_yaml(schema):
    # what `snakemake --config lm='{num_layers: 12}' features='{eps: 1e-4}'` hands over
    cfg = {"run": "x", "lm": {"num_layers": "12"}, "features": {"eps": "1e-4"},
           "vlm": {"stage1": {"train_vision": "false"}}}
    validate_config(cfg, schema)
    assert cfg["lm"]["num_layers"] == 12 and cfg["features"]["eps"] == 1e-4
    assert cfg["vlm"]["stage1"]["train_vision"] is False
    assert "lm.num_layers" in _error({"run": "x", "lm": {"num_layers": "twelve"}}, schema)
    validate_config(cfg := {"run": "123"}, schema)
    assert cfg["run"] == "123"  # string keys stay strings


def test_bad_value_is_named(schema):
    assert "device" in _error({"run": "x", "device": "gpu-please"}, schema)
    assert "run" in _error({"run": "has space"}, schema)


def test_missing_path_is_named(schema, tmp_path):
    msg = _error({"run": "x", "world": {"scene": {"font": str(tmp_path / "nope.ttf")}}}, schema)
    assert "world.scene.font" in msg and "nope.ttf" in msg
    font = tmp_path / "font.ttf"
    font.write_bytes(b"")
    validate_config({"run": "x", "world": {"scene": {"font": str(font)}}}, schema)


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


# ---------------------------------------------------------------------------------------------
# One source of defaults: the schema's defaults are the values that run, config.yaml only what
# differs from them.


def _leaves(d, path=()):
    if isinstance(d, dict) and d:
        for k, v in d.items():
            yield from _leaves(v, (*path, k))
    else:
        yield path, d


def _resolved(schema, path):
    """The schema at `path` with $ref / allOf merged in (as defaults are filled)."""
    from vlmdiff.config import _resolve

    sub = schema
    for name in path:
        sub = _resolve(sub, schema).get("properties", {}).get(name)
        if sub is None:
            return None
    return _resolve(sub, schema)


def test_config_yaml_sets_only_what_differs_from_the_schema(root, schema):
    """No value written twice: each key config.yaml sets has no schema default, or another one."""
    cfg = yaml.safe_load((root / "config.yaml").read_text())
    for path, value in _leaves(cfg):
        sub = _resolved(schema, path)
        assert sub is not None, f"config.yaml sets {'.'.join(path)}, which the schema lacks"
        assert "default" not in sub or sub["default"] != value, (
            f"config.yaml repeats the schema default of {'.'.join(path)} ({value!r})"
        )


def test_every_schema_key_has_a_default_or_is_required(schema):
    from vlmdiff.config import _resolve

    def walk(sub, path, required):
        sub = _resolve(sub, schema)
        if path and "default" not in sub:
            assert path[-1] in required, f"{'.'.join(path)}: no default and not required"
        for name, child in sub.get("properties", {}).items():
            walk(child, (*path, name), sub.get("required", []))

    walk(schema, (), [])
    assert schema["required"] == ["run"] and "default" not in schema["properties"]["run"]


# Values the default preset ran with when they were written in config.yaml.
DEFAULT_RUN = {
    "run": "default",
    "seed": 0,
    "device": "auto",
    "world.scene.image_size": 48,
    "world.sizes.train": 40000,
    "world.sizes.corpus": 12000,
    "world.questions_per_image": 4,
    "lm.hidden_size": 64,
    "lm.intermediate_size": 192,
    "lm.init_std": 0.1,
    "lm.train.steps": 800,
    "lm.train.lr": 3.0e-3,
    "vision.hidden_size": 96,
    "vision.patch_size": 12,
    "vision.pretrain.lr": 8.0e-3,
    "vlm.stage1.steps": 120,
    "vlm.stage1.warmup_steps": 15,
    "vlm.stage2.steps": 500,
    "cache.batch_size": 64,
    "cache.max_samples.train": 8000,
    "sae.k": 16,
    "sae.eval_tokens": 40000,
    "sae.base.lr": 2.0e-4,
    "sae.base.max_tokens": 1500000,
    "sae.base.checkpoint_every_tokens": None,
    "sae.adapt.lr": 1.0e-4,
    "sae.adapt.layer_lr_decay": 0.97,
    "sae.adapt.checkpoint_every_tokens": 100000,
    "sae.splice.batch_size": 50,
    "features.eps": 1.0e-3,
    "causal.attribution.top_k": 10,
    "autointerp.backend": "auto",
}


def _get(cfg, key):
    for name in key.split("."):
        cfg = cfg[name]
    return cfg


def test_defaults_are_the_values_that_run():
    cfg = merged_config()
    got = {key: _get(cfg, key) for key in DEFAULT_RUN}
    assert got == DEFAULT_RUN
    assert all(type(got[k]) is type(v) for k, v in DEFAULT_RUN.items())  # 64, not 64.0
    assert len(cfg["neutral_prompts"]) == 4


def test_presets_merge_over_the_defaults(root):
    tiny = merged_config([root / "presets/tiny.yaml"])
    assert tiny["run"] == "tiny" and tiny["lm"]["hidden_size"] == 32
    assert tiny["sae"]["adapt"]["layer_lr_decay"] == 0.97  # not set by the preset
    paper = merged_config([root / "presets/paper.yaml"])
    assert paper["sae"]["k"] == 50 and paper["sae"]["base"]["max_tokens"] == 1500000


def test_print_config(root, capsys):
    main(["--configfile", str(root / "presets/tiny.yaml")])
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed == merged_config([root / "presets/tiny.yaml"])
    proc = subprocess.run([sys.executable, "-m", "vlmdiff.config"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert yaml.safe_load(proc.stdout) == merged_config()


def test_print_config_names_a_bad_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("sae: {k: 0}\n")
    proc = subprocess.run([sys.executable, "-m", "vlmdiff.config", "--configfile", str(bad)],
                          capture_output=True, text=True)
    assert proc.returncode != 0 and "sae.k" in proc.stderr


def test_section_fills_its_own_defaults_and_names_keys_in_full():
    assert section("vlm.stage1")["steps"] == 120 and section("vlm.stage2")["steps"] == 500
    assert section("lm.train", {"steps": 3}) == {**section("lm.train"), "steps": 3}
    with pytest.raises(ConfigError, match=r"world\.scene\.max_objects"):
        section("world.scene", {"max_objects": 9})
    with pytest.raises(ConfigError, match=r"lm\.train\.train_vision"):
        section("lm.train", {"train_vision": True})  # a stage-1 key only
    with pytest.raises(KeyError):
        section("world.nowhere")


def test_missing_run_is_named(schema):
    assert "'run' must be given" in _error({}, schema)
