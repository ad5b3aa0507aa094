import json
from pathlib import Path

from vlmdiff.config import ConfigError, load_schema, validate_config

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
    """`{key: png, key_pdf: pdf}` for figures given as `{key: file stem}`."""
    out = {}
    for key, stem in figures.items():
        out[key] = f"{R}/figures/{stem}.png"
        out[f"{key}_pdf"] = f"{R}/figures/{stem}.pdf"
    return out


def feature_targets():
    tables = ["features.parquet", "features.csv", "selected_features.csv",
              "selected_features.parquet", "feature_sets.csv", "threshold_sweep.csv",
              "ground_truth.csv", "ground_truth_summary.csv"]
    return [f"{R}/tables/{t}" for t in tables] + list(figure_outputs(FEATURE_FIGURES).values())


def all_targets():
    return [
        f"{R}/world/summary.json",
        f"{R}/models/vlm_eval.csv",
        f"{R}/models/vlm_eval.png",
        f"{R}/figures/fig1_fvu_adaptation.png",
        f"{R}/figures/fig5_decoder_cosine.png",
        f"{R}/figures/fig6_fvu_per_layer.png",
        f"{R}/tables/sae_adaptation.csv",
        *feature_targets(),
        *causal_targets(),
    ]


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
