import json
from pathlib import Path

from vlmdiff.config import ConfigError, load_schema, validate_config
from vlmdiff.interp.backends import backend_kind, backend_problem
from vlmdiff.sources.check import SourceMismatch, check_sources, source_problems

try:
    validate_config(config, load_schema(Path(workflow.basedir) / "schemas/config.schema.yaml"))
except ConfigError as err:
    raise WorkflowError(f"invalid config: {err}") from None

ENV = "../envs/vlmdiff.yaml"
RUN = config["run"]
R = f"results/{RUN}"
LOGS = f"{R}/logs"
BENCH = f"{R}/benchmarks"
WORLD_SPLITS = ["train", "val", "spatial", "ocr", "vsr", "corpus"]
CACHE_SPLITS = ["corpus", "train", "val", "spatial", "ocr"]
LAYERS = list(range(config["lm"]["num_layers"]))
REGIMES = config["sae"]["regimes"]
SHARDS = list(range(config["cache"]["shards"]))

# Sources: drawn/trained by the workflow, or imported (paper preset). Only the producing
# rules differ; every downstream rule reads the same files.
SOURCE = config["source"]
SHAPES_WORLD = SOURCE["world"] == "shapes"
TRAIN_MODELS = SOURCE["models"] == "train"
TRAIN_SAES = SOURCE["saes"] == "train"
MODEL_CHECK = f"{R}/models/sources_check.json"


def check_source_config(source, layers, config_layers):
    """Source combinations and locations; local model and SAE files checked against each other
    while the DAG is built, so a mismatch stops the run before any job starts."""
    problems = source_problems(source)
    if problems:
        raise WorkflowError("invalid config: " + "; ".join(problems))
    if source["models"] == "import":
        try:
            check_sources(source, layers, config_layers, local_only=True)
        except (SourceMismatch, ValueError, FileNotFoundError) as err:
            raise WorkflowError(f"model and SAEs do not fit: {err}") from None


check_source_config(SOURCE, LAYERS, config["lm"]["num_layers"])


def world_file(split):
    return f"{R}/world/{split}.parquet"


def cache_stores(model, split):
    return expand(f"{R}/cache/{model}/{split}/shard{{shard}}.zarr", shard=SHARDS)


def cache_model_dir(wildcards):
    return f"{R}/models/lm" if wildcards.model == "lm" else f"{R}/models/vlm_stage2"


def cache_split_file(wildcards):
    return world_file(wildcards.split)


def cache_mode(wildcards):
    return "text" if wildcards.model == "lm" else "vqa"


def cache_text_source(wildcards):
    return "corpus" if wildcards.split == "corpus" else "questions"


def cache_max_samples(wildcards):
    return config["cache"]["max_samples"].get(wildcards.split, 0)


def cache_shard(wildcards):
    return [int(wildcards.shard), config["cache"]["shards"]]


def adapt_checkpoint_dir(wildcards):
    return f"{R}/sae/{wildcards.regime}/layer_{wildcards.layer}.checkpoint"


def regime_sae_dirs(wildcards):
    return expand(f"{R}/sae/{wildcards.regime}/layer_{{layer}}", layer=LAYERS)


# Exports: every SAE (base and each regime) in SAELens's and sparsify's formats
EXPORT = config["sae"]["export"]
EXPORTS = expand(f"{R}/exports/{{regime}}", regime=["base", *REGIMES])
if EXPORT["jumprelu"] and TRAIN_SAES:
    raise WorkflowError(
        "invalid config: sae.export.jumprelu needs source.saes: llama_scope "
        "(only a Llama-Scope release has a JumpReLU of its own)"
    )


def export_jumprelu(wildcards):
    """The release's JumpReLU beside the TopK export: imported base layers only."""
    return EXPORT["jumprelu"] and wildcards.regime == "base"


def export_model_name(wildcards):
    """The model whose activations the SAE reads, as SAELens's metadata names it (none for an
    imported release's base SAEs: the release's own model is not one of the run's folders)."""
    if wildcards.regime != "base":
        return f"{R}/models/vlm_stage2"
    return f"{R}/models/lm" if TRAIN_MODELS or SOURCE["lm"] else None


# Stages 2-3: features
FEATURE_REGIME = config["features"]["regime"]
FEATURE_SPLITS = ["val", "spatial", "ocr"]  # D_base, D_sp, D_ocr
CONTRASTS = ["spatial", "ocr"]
FEATURE_STATS = expand(f"{R}/features/stats/layer_{{layer}}.nc", layer=LAYERS)
FEATURE_FIGURES = {
    "fig2": "fig2_feature_selection",
    "fig7": "fig7_adapted_per_layer",
    "fig8": "fig8_threshold_sweep",
    "fig9": "fig9_firing_frequency",
    "fig10": "fig10_ocr_features",
}
if FEATURE_REGIME not in REGIMES:
    raise WorkflowError(
        f"invalid config: features.regime {FEATURE_REGIME!r} is not in sae.regimes {REGIMES}"
    )


def contrast_split_file(wildcards):
    return world_file(wildcards.contrast)


def contrast_thresholds(wildcards):
    return config["features"][wildcards.contrast]


def lexical_prompts(wildcards):
    """Spatial candidates get the world's neutral prompts; OCR ones their own."""
    if wildcards.contrast == "spatial":
        return config["neutral_prompts"]
    return config["features"][wildcards.contrast]["neutral_prompts"]


def figure_outputs(figures):
    """`{key: png, key_pdf: pdf}` for figures given as `{key: file stem}`; the PNG is marked
    for `snakemake --report` with its caption (report/{stem}.rst) and paper section."""
    out = {}
    for key, stem in figures.items():
        out[key] = report_output(f"{R}/figures/{stem}.png")
        out[f"{key}_pdf"] = f"{R}/figures/{stem}.pdf"
    return out


def report_output(path, kind="figure"):
    """`path` marked for `snakemake --report`: caption report/{stem}.rst, the paper's section."""
    from vlmdiff.interp.report import section_of

    stem = Path(path).stem
    return report(
        path, caption=f"{workflow.basedir}/report/{stem}.rst", category=section_of(stem, kind).title
    )


def feature_targets():
    tables = [
        "features.parquet",
        "features.csv",
        "selected_features.csv",
        "selected_features.parquet",
        "feature_sets.csv",
        "threshold_sweep.csv",
        *(["ground_truth.csv", "ground_truth_summary.csv"] if SHAPES_WORLD else []),
    ]
    return [f"{R}/tables/{t}" for t in tables] + list(figure_outputs(FEATURE_FIGURES).values())


def all_targets():
    return [
        *source_targets(),
        f"{R}/figures/fig1_fvu_adaptation.png",
        f"{R}/figures/fig5_decoder_cosine.png",
        f"{R}/figures/fig6_fvu_per_layer.png",
        f"{R}/tables/sae_adaptation.csv",
        *EXPORTS,
        *feature_targets(),
        *causal_targets(),
        *report_targets(),
    ]


def source_targets():
    """World summary and model evaluation (shapes, trained) or the import summaries."""
    if SHAPES_WORLD:
        out = [f"{R}/world/summary.json"]
    else:
        out = [f"{R}/world/vqav2_summary.json", f"{R}/world/vsr_summary.json"]
    if TRAIN_MODELS:
        out += [f"{R}/models/vlm_eval.{x}" for x in ("csv", "png")]
        out += [f"{R}/models/vlm_eval_relations.{x}" for x in ("csv", "png")]
        out += [f"{R}/models/vlm_eval_errors.{x}" for x in ("csv", "png")]
        out += [f"{R}/models/vlm_eval_positions.{x}" for x in ("csv", "png")]
    else:
        out += [f"{R}/models/vlm_stage2"]
        out += [f"{R}/models/vlm_stage1"] if SOURCE["vlm_stage1"] else []
        out += [f"{R}/models/lm"] if SOURCE["lm"] else []
    return out


# Stage 4: causal experiments (attribution patching, ablation, steering)
CAUSAL = config["causal"]
CAUSAL_FIGURES = {
    "fig12": "fig12_attribution_layers",
    "fig13": "fig13_attribution_heads",
    "check": "fig_attribution_vs_patching",
}
OVERLAY_FIGURES = {
    "fig4": "fig4_recurring_head",
    "fig14": "fig14_attribution_features",
    "fig15": "fig15_bottom_heads",
    "fig16": "fig16_custom_queries",
}
STEERING_FIGURES = {"steering": "fig_steering_flip_rate"}
ABLATION_TABLES = {
    f"{name}_{ext}": f"{R}/tables/{stem}.{ext}"
    for name, stem in (("table1", "table1_ablation"), ("table2", "table2_ablation_full"))
    for ext in ("csv", "md", "tex")
}
# the paper's tables 1 and 2 in `snakemake --report`
for _name in ("table1", "table2"):
    ABLATION_TABLES[f"{_name}_csv"] = report_output(ABLATION_TABLES[f"{_name}_csv"], "table")
FEATURE_SAES = expand(f"{R}/sae/{FEATURE_REGIME}/layer_{{layer}}", layer=LAYERS)


def causal_targets():
    figures = {**CAUSAL_FIGURES, **OVERLAY_FIGURES, **STEERING_FIGURES}
    return [
        f"{R}/causal/attribution.nc",
        f"{R}/tables/attribution_vs_patching.csv",
        f"{R}/tables/attribution_top_heads.csv",
        f"{R}/tables/ablation_runs.csv",
        f"{R}/tables/steering.csv",
        *ABLATION_TABLES.values(),
        *figure_outputs(figures).values(),
    ]


def vsr_template(wildcards):
    """The VSR question template; a function, since its `{question}` is no wildcard."""
    return CAUSAL["ablation"]["vsr_template"]


# Stage 5: auto-interp, dashboards, the report

AUTOINTERP = config["autointerp"]
# what the autointerp job needs of the config: the backend and the scoring protocol
AUTOINTERP_BACKEND = {
    key: AUTOINTERP[key] for key in ("backend", "rounds", "attempts", "openai", "local")
}
AUTOINTERP_FIGURES = {"fig_autointerp": "fig_autointerp_f1"}
# `autointerp.backend: none` runs the DAG without auto-interp: evidence and dashboards only
AUTOINTERP_ON = backend_kind(AUTOINTERP) != "none"
REPORT_HTML = f"{R}/report.html"


def neuronpedia_url(wildcards):
    """The feature pages' link to the base SAE's feature on Neuronpedia (imported releases it
    hosts), `{layer}` and `{index}` left for the pages to fill; a function, since a params
    string's braces would be read as wildcards."""
    if TRAIN_SAES or not SOURCE["neuronpedia"]:
        return None
    return f"https://www.neuronpedia.org/{SOURCE['neuronpedia']}"


def check_autointerp_backend(cfg):
    """The backend can run (model file, key, endpoint): checked while the DAG is built, so a
    run that would end in auto-interp does not stop there after an hour."""
    problem = backend_problem(cfg)
    if problem:
        raise WorkflowError(f"auto-interp cannot run: {problem}")


check_autointerp_backend(AUTOINTERP)


def autointerp_dirs():
    """The RAW and OVERLAY record folders the dashboards read (none when switched off)."""
    if not AUTOINTERP_ON:
        return {}
    return {v: f"{R}/autointerp/{v}" for v in ("raw", "overlay")}


def report_targets():
    tables = [f"{R}/tables/autointerp.{x}" for x in ("csv", "md")]
    return [
        *(tables + list(figure_outputs(AUTOINTERP_FIGURES).values()) if AUTOINTERP_ON else []),
        f"{R}/dashboards",
        REPORT_HTML,
    ]


def report_inputs():
    """Every other target of the run: the report shows them all."""
    return [t for t in all_targets() if t not in (REPORT_HTML, f"{R}/dashboards")]
