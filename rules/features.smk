# Stages 2-3 (paper sections 4.2-4.3): per-feature statistics, the adapted, spatial and OCR
# sets, the threshold sweep. Thresholds reach only the jobs after the statistics pass, so
# changing p_cos or eps re-runs only select_features and what reads its table.


rule feature_stats:
    """Stream D_base, D_sp and D_ocr caches of one layer through its adapted SAE: firing
    counts, squared activations and top-activating samples per feature. No thresholds."""
    input:
        **{split: cache_stores("vlm", split) for split in FEATURE_SPLITS},
        sae=f"{R}/sae/{FEATURE_REGIME}/layer_{{layer}}",
    output:
        stats=f"{R}/features/stats/layer_{{layer}}.nc",
    log:
        f"{LOGS}/features/stats_layer_{{layer}}.log",
    benchmark:
        f"{BENCH}/features/stats_layer_{{layer}}.tsv"
    wildcard_constraints:
        layer=r"\d+",
    conda:
        ENV
    threads: 1
    resources:
        mem_mb=3000,
        runtime=60,
        gpu=1,
    params:
        splits=FEATURE_SPLITS,
        batch_tokens=config["features"]["batch_tokens"],
        top_samples=config["features"]["top_samples"],
        device=config["device"],
    script:
        "../workflow_scripts/feature_stats.py"


rule lexical_filter:
    """Candidates of one contrast (Δp and OR thresholds), re-run on their top samples with
    neutral prompts: pass rate per candidate."""
    input:
        vlm=f"{R}/models/vlm_stage2",
        split=contrast_split_file,
        stats=FEATURE_STATS,
        saes=expand(f"{R}/sae/{FEATURE_REGIME}/layer_{{layer}}", layer=LAYERS),
    output:
        table=f"{R}/features/lexical_{{contrast}}.csv",
    log:
        f"{LOGS}/features/lexical_{{contrast}}.log",
    benchmark:
        f"{BENCH}/features/lexical_{{contrast}}.tsv"
    wildcard_constraints:
        contrast="spatial|ocr",
    conda:
        ENV
    threads: 2
    resources:
        mem_mb=4000,
        runtime=60,
        gpu=1,
    params:
        thresholds=contrast_thresholds,
        frequency=config["features"]["frequency"],
        prompts=lexical_prompts,
        lexical=config["features"]["lexical"],
        layers=LAYERS,
        device=config["device"],
    script:
        "../workflow_scripts/lexical_filter.py"


rule select_features:
    """The feature table: statistics of every (layer, feature), adapted set (p_cos, eps),
    candidates, lexical verdicts, spatial and OCR sets, the chosen subsets."""
    input:
        stats=FEATURE_STATS,
        cosine=f"{R}/sae/decoder_cosine.nc",
        lexical=expand(f"{R}/features/lexical_{{contrast}}.csv", contrast=CONTRASTS),
    output:
        features_parquet=f"{R}/tables/features.parquet",
        features_csv=f"{R}/tables/features.csv",
        selected_parquet=f"{R}/tables/selected_features.parquet",
        selected_csv=f"{R}/tables/selected_features.csv",
        sets=f"{R}/tables/feature_sets.csv",
        per_layer=f"{R}/tables/adapted_per_layer.csv",
    log:
        f"{LOGS}/features/select_features.log",
    benchmark:
        f"{BENCH}/features/select_features.tsv"
    conda:
        ENV
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    params:
        regime=FEATURE_REGIME,
        contrasts=CONTRASTS,
        frequency=config["features"]["frequency"],
        thresholds={c: config["features"][c] for c in CONTRASTS},
        p_cos=config["features"]["p_cos"],
        eps=config["features"]["eps"],
        n_selected=config["features"]["n_selected"],
    script:
        "../workflow_scripts/select_features.py"


rule threshold_sweep:
    """Adapted-set size, Jaccard with the operating point, per-layer count correlation over a
    grid of p_cos and eps."""
    input:
        features=f"{R}/tables/features.parquet",
    output:
        table=f"{R}/tables/threshold_sweep.csv",
    log:
        f"{LOGS}/features/threshold_sweep.log",
    benchmark:
        f"{BENCH}/features/threshold_sweep.tsv"
    conda:
        ENV
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    params:
        sweep=config["features"]["sweep"],
        p_cos=config["features"]["p_cos"],
        eps=config["features"]["eps"],
    script:
        "../workflow_scripts/threshold_sweep.py"


rule ground_truth:
    """Share of each set feature's top D_base samples that truly are of the contrast's family,
    against random adapted features (possible because the workflow draws the world)."""
    input:
        features=f"{R}/tables/features.parquet",
        stats=FEATURE_STATS,
        val=world_file("val"),
    output:
        per_feature=f"{R}/tables/ground_truth.csv",
        summary=f"{R}/tables/ground_truth_summary.csv",
    log:
        f"{LOGS}/features/ground_truth.log",
    benchmark:
        f"{BENCH}/features/ground_truth.tsv"
    conda:
        ENV
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    params:
        contrasts=CONTRASTS,
        random_features=config["features"]["ground_truth"]["random_features"],
        seed=config["seed"],
    script:
        "../workflow_scripts/ground_truth.py"


rule feature_figures:
    """Figures 2, 7, 8, 9 and 10."""
    input:
        features=f"{R}/tables/features.parquet",
        per_layer=f"{R}/tables/adapted_per_layer.csv",
        sweep=f"{R}/tables/threshold_sweep.csv",
    output:
        **figure_outputs(FEATURE_FIGURES),
    log:
        f"{LOGS}/features/figures.log",
    benchmark:
        f"{BENCH}/features/figures.tsv"
    conda:
        ENV
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    params:
        p_cos=config["features"]["p_cos"],
        eps=config["features"]["eps"],
        thresholds={c: config["features"][c] for c in CONTRASTS},
    script:
        "../workflow_scripts/feature_figures.py"
