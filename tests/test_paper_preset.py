"""The paper preset on tiny fixtures in the real on-disk formats: its DAG plans (locally and
with the Slurm executor), the import rules run, and model/SAE mismatches stop the run early."""

import json
import os
import re
import subprocess
import sys

import pytest
import yaml
from paper_fixtures import (
    D_MODEL,
    N_LAYERS,
    write_clip,
    write_llama_scope,
    write_llava_llama,
    write_vqav2,
    write_vsr,
)
from vlmdiff.cache.read import open_store
from vlmdiff.sources.check import SourceMismatch, check_sources, source_problems
from vlmdiff.sources.llama_scope import load_llama_scope
from vlmdiff.world.layouts import load_split

pytestmark = pytest.mark.workflow


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory):
    root = tmp_path_factory.mktemp("paper_sources")
    clip = write_clip(root / "clip")
    write_llava_llama(root / "llava_more", clip, tower_in_checkpoint=False)
    write_llama_scope(root / "llama_scope", range(N_LAYERS))
    write_llama_scope(root / "llama_scope_small", range(N_LAYERS), d_model=D_MODEL // 2)
    write_vqav2(root / "vqav2", {"validation": 24, "test": 30, "testdev": 6})
    write_vsr(root / "vsr", root / "coco", missing=1)
    return root


def overlay(root, workdir, **changes):
    """presets/paper.yaml with every source pointing at the fixtures (no network)."""
    cfg = {
        "source": {
            "vlm": str(root / "llava_more"),
            "llama_scope": str(root / "llama_scope"),
            "vqav2": {"path": str(root / "vqav2"), "adapt_samples": 20, "base_samples": 0},
            "vsr": {"path": str(root / "vsr"), "coco_images": str(root / "coco"),
                    "missing_images": "skip"},
        },
        "lm": {"num_layers": N_LAYERS},
        "device": "cpu",
        "cache": {"shards": 2, "batch_size": 8},
    }
    for key, value in changes.items():
        section, name = key.split("__")
        cfg[section][name] = value
    path = workdir / "overlay.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def snakemake(root, workdir, *args, configfiles=()):
    cmd = [sys.executable, "-m", "snakemake", "--cores", "1", "-s", str(root / "Snakefile"),
           "--directory", str(workdir), *args]
    if configfiles:
        cmd += ["--configfile", *map(str, configfiles)]
    # the preset's auto-interp talks to api.openai.com, whose key the DAG's backend check asks
    # for; these runs plan or import, and never call it
    env = {**os.environ, "OPENAI_API_KEY": os.environ.get("OPENAI_API_KEY") or "sk-not-used"}
    return subprocess.run(cmd, capture_output=True, text=True, cwd=root, env=env)


def job_counts(stdout):
    """`{rule: count}` from snakemake's job stats table."""
    table = stdout.split("Job stats:")[1].split("total")[0]
    return {m.group(1): int(m.group(2)) for m in re.finditer(r"^(\w+)\s+(\d+)$", table, re.M)}


def test_paper_dag_plans_on_fixtures(root, fixtures, tmp_path):
    proc = snakemake(root, tmp_path, "-n", configfiles=[root / "presets/paper.yaml", overlay(fixtures, tmp_path)])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    jobs = job_counts(proc.stdout)
    # importers replace the world, model and base-SAE training rules
    assert jobs["check_sources"] == jobs["import_vlm"] == jobs["import_vqav2"] == jobs["import_vsr"] == 1
    assert jobs["import_base_sae"] == N_LAYERS
    for rule in ("world", "train_lm", "train_vlm_stage2", "train_base_sae", "eval_models", "ground_truth"):
        assert rule not in jobs
    # VLM caches only: 4 splits x 2 shards; adaptation per layer and regime
    assert jobs["cache_activations"] == 4 * 2
    assert jobs["adapt_sae"] == N_LAYERS * 4
    assert jobs["export_saes"] == 1 + 4  # base and every regime
    for rule in ("feature_stats", "select_features", "attribution", "ablation", "steering"):
        assert jobs[rule] >= 1


def test_paper_dag_plans_with_slurm_profile(root, fixtures, tmp_path):
    pytest.importorskip("snakemake_executor_plugin_slurm")
    for configs in ([root / "presets/tiny.yaml"],
                    [root / "presets/paper.yaml", overlay(fixtures, tmp_path)]):
        proc = snakemake(root, tmp_path, "-n", "--profile", str(root / "profiles/slurm"),
                         configfiles=configs)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        assert "Job stats:" in proc.stdout


def test_mismatched_saes_stop_before_any_job(root, fixtures, tmp_path):
    small = str(fixtures / "llama_scope_small")
    proc = snakemake(root, tmp_path, "-n", configfiles=[
        root / "presets/paper.yaml", overlay(fixtures, tmp_path, source__llama_scope=small)])
    assert proc.returncode != 0
    msg = proc.stdout + proc.stderr
    assert f"d_model={D_MODEL // 2}" in msg and f"hidden_size={D_MODEL}" in msg
    assert "llama_scope_small" in msg and "llava_more" in msg
    proc = snakemake(root, tmp_path, "-n", configfiles=[
        root / "presets/paper.yaml", overlay(fixtures, tmp_path, lm__num_layers=32)])
    assert proc.returncode != 0 and "lm.num_layers=32" in proc.stdout + proc.stderr


def test_hook_point_mismatch_is_named(fixtures, tmp_path):
    root = tmp_path / "swapped"
    write_llama_scope(root, [0])
    # layer 1's folder holds layer 0's SAE
    (root / "Llama3_1-8B-Base-L0R-8x").rename(root / "Llama3_1-8B-Base-L1R-8x")
    write_llama_scope(root, [0])
    source = {"vlm": str(fixtures / "llava_more"), "saes": "llama_scope", "llama_scope": str(root),
              "llama_scope_layer_folder": "Llama3_1-8B-Base-L{layer}R-8x"}
    with pytest.raises(SourceMismatch, match=r"blocks\.0\.hook_resid_post.*layer 1"):
        check_sources(source, [0, 1], N_LAYERS)


def test_import_rules_and_a_cache_shard_run(root, fixtures, tmp_path):
    configs = [root / "presets/paper.yaml", overlay(fixtures, tmp_path)]
    R = tmp_path / "results/paper"
    targets = [f"results/paper/cache/vlm/{s}/shard1.zarr" for s in ("val", "spatial")]
    targets += ["results/paper/sae/base/layer_1", "results/paper/world/vsr_summary.json"]
    proc = snakemake(root, tmp_path, *targets, configfiles=configs)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    check = json.loads((R / "models/sources_check.json").read_text())
    assert check["d_model"] == D_MODEL and check["n_layers"] == N_LAYERS
    imported = json.loads((R / "models/vlm_stage2_import.json").read_text())
    assert imported["image_seq_length"] == 4 and imported["pad_to_square"]
    assert len(load_split(R / "world/train.parquet", "vqa")) == 20
    vsr = json.loads((R / "world/vsr_summary.json").read_text())
    assert vsr["missing_images"] == 1 and vsr["rows"] == 5
    store = open_store(R / "cache/vlm/val/shard1.zarr")
    assert store.attrs["d_model"] == D_MODEL and store.attrs["n_layers"] == N_LAYERS
    is_image = store["is_image"][:]
    n_samples = len(set(store["sample"][:].tolist()))
    assert n_samples == 12 and int(is_image.sum()) == 4 * n_samples  # 4 image tokens each
    sae = load_llama_scope(R / "sae/base/layer_1", 1, k=50)
    assert sae.k == 50 and sae.d_model == D_MODEL


def test_base_exports_carry_the_release_jumprelu(root, fixtures, tmp_path):
    """exports/base with sae.export.jumprelu: SAELens's own jumprelu keeps the release's active
    set; the TopK exports beside it are the paper's k=50 SAE."""
    import torch
    from sae_lens import SAE
    from safetensors.torch import load_file
    from sparsify import SparseCoder
    from test_llama_scope import release_gate

    jumprelu = tmp_path / "jumprelu.yaml"
    jumprelu.write_text(yaml.safe_dump({"sae": {"export": {"jumprelu": True}}}))
    configs = [root / "presets/paper.yaml", overlay(fixtures, tmp_path), jumprelu]
    proc = snakemake(root, tmp_path, "results/paper/exports/base", configfiles=configs)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    exports = tmp_path / "results/paper/exports/base"
    gen = torch.Generator().manual_seed(0)
    for layer in range(N_LAYERS):
        release = fixtures / "llama_scope" / f"Llama3_1-8B-Base-L{layer}R-8x"
        hp = json.loads((release / "hyperparams.json").read_text())
        tensors = load_file(str(release / "checkpoints/final.safetensors"))
        x = torch.randn(100, D_MODEL, generator=gen) * 3.0 / D_MODEL**0.5
        keep = release_gate(hp, tensors, x, hp["jump_relu_threshold"])
        hook = f"blocks.{layer}.hook_resid_post"
        sae = SAE.load_from_disk(str(exports / "saelens_jumprelu" / hook))
        with torch.no_grad():
            acts = sae.encode(x)
        assert 0 < int(keep.sum()) < keep.numel()
        assert torch.equal(acts > 0, keep)
        assert SAE.load_from_disk(str(exports / "saelens" / hook)).cfg.k == 50
        assert SparseCoder.load_from_disk(exports / "sparsify" / f"layers.{layer}").cfg.k == 50


def test_source_problems_name_impossible_combinations(tmp_path):
    source = {"world": "shapes", "models": "train", "saes": "train", "vlm": None,
              "llama_scope": None, "vqav2": {"path": None}, "vsr": {"path": None, "coco_images": None}}
    assert source_problems(source) == []
    bad = {**source, "world": "vqav2", "saes": "llama_scope"}
    problems = " | ".join(source_problems(bad))
    assert "vqav2 needs source.vqav2.path" in problems
    assert "train works on the shapes world only" in problems
    assert "llama_scope needs source.llama_scope" in problems
    missing = {**source, "models": "import", "vlm": str(tmp_path / "nowhere")}
    problems = " | ".join(source_problems(missing))
    assert "source.vlm" in problems and "neither a local path nor a Hub id" in problems
