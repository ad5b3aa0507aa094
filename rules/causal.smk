# Stage 4 (paper 5.2-5.3, App. C-E): which attention heads drive each selected feature
# (attribution patching, checked against exact activation patching), their attention drawn
# over the images, and whether the feature is used (ablation, steering). An empty
# selected_features table is not an error: every output says so.


rule mean_image_embedding:
    """The corrupt run's layer-0 image embeddings: per-patch mean of the projector's outputs
    over distinct train images (computed once)."""
    input:
        vlm=f"{R}/models/vlm_stage2",
        split=world_file("train"),
    output:
        mean=f"{R}/causal/mean_image_embedding.nc",
    log:
        f"{LOGS}/causal/mean_image_embedding.log",
    benchmark:
        f"{BENCH}/causal/mean_image_embedding.tsv"
    conda:
        ENV
    threads: 1
    resources:
        mem_mb=3000,
        runtime=20,
        gpu=1,
    params:
        samples=CAUSAL["attribution"]["mean_samples"],
        batch_size=CAUSAL["attribution"]["batch_size"],
        seed=config["seed"],
        device=config["device"],
    script:
        "../workflow_scripts/mean_image_embedding.py"


rule attribution:
    """Methods A and B per layer, head and variant for each selected feature, averaged over its
    top-k D_base samples; exact one-head-at-a-time patching and its rank correlations."""
    input:
        vlm=f"{R}/models/vlm_stage2",
        val=world_file("val"),
        stats=FEATURE_STATS,
        selected=f"{R}/tables/selected_features.parquet",
        saes=FEATURE_SAES,
        mean=f"{R}/causal/mean_image_embedding.nc",
    output:
        scores=f"{R}/causal/attribution.nc",
        check=f"{R}/tables/attribution_vs_patching.csv",
    log:
        f"{LOGS}/causal/attribution.log",
    benchmark:
        f"{BENCH}/causal/attribution.tsv"
    conda:
        ENV
    threads: 2
    resources:
        mem_mb=4000,
        runtime=60,
        gpu=1,
    params:
        layers=LAYERS,
        contrast=CAUSAL["contrast"],
        max_features=CAUSAL["max_features"],
        attribution=CAUSAL["attribution"],
        device=config["device"],
    script:
        "../workflow_scripts/attribution.py"


rule attribution_figures:
    """Figures 12 and 13, the check against exact patching, and the top/bottom heads table."""
    input:
        scores=f"{R}/causal/attribution.nc",
    output:
        **figure_outputs(CAUSAL_FIGURES),
        heads=f"{R}/tables/attribution_top_heads.csv",
    log:
        f"{LOGS}/causal/attribution_figures.log",
    benchmark:
        f"{BENCH}/causal/attribution_figures.tsv"
    conda:
        ENV
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    params:
        variant=CAUSAL["attribution"]["variant"],
        n_heads=CAUSAL["overlays"]["n_heads"],
    script:
        "../workflow_scripts/attribution_figures.py"


rule vsr_activations:
    """Each selected feature's max activation over the prompt tokens of every VSR row (the
    caches hold no VSR): its SAE encodes the hooked block output."""
    input:
        vlm=f"{R}/models/vlm_stage2",
        vsr=world_file("vsr"),
        selected=f"{R}/tables/selected_features.parquet",
        saes=FEATURE_SAES,
    output:
        acts=f"{R}/causal/vsr_activations.nc",
    log:
        f"{LOGS}/causal/vsr_activations.log",
    benchmark:
        f"{BENCH}/causal/vsr_activations.tsv"
    conda:
        ENV
    threads: 1
    resources:
        mem_mb=3000,
        runtime=30,
        gpu=1,
    params:
        layers=LAYERS,
        contrast=CAUSAL["contrast"],
        max_features=CAUSAL["max_features"],
        template=vsr_template,
        batch_size=CAUSAL["ablation"]["batch_size"],
        device=config["device"],
    script:
        "../workflow_scripts/vsr_activations.py"


rule attention_overlays:
    """Figures 4, 14, 15 and 16: attention of top-, bottom-ranked and recurring heads drawn
    over the features' top-activating VQA and VSR images, and under custom queries; in the
    shapes world, how much of the top and bottom heads' attention falls on the named objects."""
    input:
        vlm=f"{R}/models/vlm_stage2",
        scores=f"{R}/causal/attribution.nc",
        val=world_file("val"),
        vsr=world_file("vsr"),
        stats=FEATURE_STATS,
        acts=f"{R}/causal/vsr_activations.nc",
    output:
        **figure_outputs(OVERLAY_FIGURES),
        focus=f"{R}/tables/head_object_attention.csv",
    log:
        f"{LOGS}/causal/attention_overlays.log",
    benchmark:
        f"{BENCH}/causal/attention_overlays.tsv"
    conda:
        ENV
    threads: 1
    resources:
        mem_mb=3000,
        runtime=20,
        gpu=1,
    params:
        variant=CAUSAL["attribution"]["variant"],
        overlays=CAUSAL["overlays"],
        top_vsr=CAUSAL["ablation"]["top_vsr"],
        min_relation_share=CAUSAL["ablation"]["min_relation_share"],
        template=vsr_template,
        device=config["device"],
    script:
        "../workflow_scripts/attention_overlays.py"


rule ablation:
    """Tables 1 and 2: the feature's direction projected out at text positions; accuracy on
    its relation-specific VSR subset and on VQA yes/no, against random same-layer features."""
    input:
        vlm=f"{R}/models/vlm_stage2",
        vsr=world_file("vsr"),
        val=world_file("val"),
        selected=f"{R}/tables/selected_features.parquet",
        features=f"{R}/tables/features.parquet",
        saes=FEATURE_SAES,
        acts=f"{R}/causal/vsr_activations.nc",
    output:
        **ABLATION_TABLES,
        runs=f"{R}/tables/ablation_runs.csv",
    log:
        f"{LOGS}/causal/ablation.log",
    benchmark:
        f"{BENCH}/causal/ablation.tsv"
    conda:
        ENV
    threads: 2
    resources:
        mem_mb=4000,
        runtime=60,
        gpu=1,
    params:
        layers=LAYERS,
        contrast=CAUSAL["contrast"],
        max_features=CAUSAL["max_features"],
        template=vsr_template,
        ablation=CAUSAL["ablation"],
        device=config["device"],
    script:
        "../workflow_scripts/ablation.py"


rule steering:
    """Flip rate of the yes/no answer when alpha * v is added at text positions, on the
    relation subset, on VQA yes/no and for a random same-layer feature."""
    input:
        vlm=f"{R}/models/vlm_stage2",
        vsr=world_file("vsr"),
        val=world_file("val"),
        selected=f"{R}/tables/selected_features.parquet",
        features=f"{R}/tables/features.parquet",
        saes=FEATURE_SAES,
        acts=f"{R}/causal/vsr_activations.nc",
    output:
        **figure_outputs(STEERING_FIGURES),
        table=f"{R}/tables/steering.csv",
    log:
        f"{LOGS}/causal/steering.log",
    benchmark:
        f"{BENCH}/causal/steering.tsv"
    conda:
        ENV
    threads: 2
    resources:
        mem_mb=4000,
        runtime=60,
        gpu=1,
    params:
        layers=LAYERS,
        contrast=CAUSAL["contrast"],
        max_features=CAUSAL["max_features"],
        template=vsr_template,
        ablation=CAUSAL["ablation"],
        steering=CAUSAL["steering"],
        seed=config["seed"],
        device=config["device"],
    script:
        "../workflow_scripts/steering.py"
