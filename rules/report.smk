# Stage 5 (paper 5.1, App. B.1): auto-interpretation of the selected features in two variants
# (RAW, OVERLAY), a dashboard page per feature, and results/{run}/report.html with every
# figure and table of the run. The language model's answers are cached outside the outputs
# (autointerp/cache), so a re-run or an interrupted run never asks a finished feature again.


rule autointerp_evidence:
    """Each feature's top samples (VQA, VQA-spatial, VSR, deduplicated), held-out positives,
    random and hard negatives: pictures, prompt-token activations, top-head heat maps; for
    every feature with a page (every spatial and OCR set member) its activation histogram over
    D_base, examples across activation quantiles and logit effects."""
    input:
        vlm=f"{R}/models/vlm_stage2",
        val=world_file("val"),
        spatial=world_file("spatial"),
        vsr=world_file("vsr"),
        stats=FEATURE_STATS,
        selected=f"{R}/tables/selected_features.parquet",
        features=f"{R}/tables/features.parquet",
        saes=FEATURE_SAES,
        scores=f"{R}/causal/attribution.nc",
    output:
        evidence=directory(f"{R}/autointerp/evidence"),
    log:
        f"{LOGS}/report/autointerp_evidence.log",
    benchmark:
        f"{BENCH}/report/autointerp_evidence.tsv"
    conda:
        ENV
    threads: 1
    resources:
        mem_mb=3000,
        runtime=20,
        gpu=1,
    params:
        layers=LAYERS,
        contrasts=AUTOINTERP["contrasts"],
        max_features=AUTOINTERP["max_features"],
        k=AUTOINTERP["k"],
        holdout=AUTOINTERP["holdout"],
        quantiles=AUTOINTERP["quantiles"],
        negatives=AUTOINTERP["negatives"],
        hard_negatives=AUTOINTERP["hard_negatives"],
        negative_max_fraction=AUTOINTERP["negative_max_fraction"],
        n_heads=AUTOINTERP["n_heads"],
        pages=AUTOINTERP["pages"],
        variant=CAUSAL["attribution"]["variant"],
        template=vsr_template,
        batch_size=AUTOINTERP["batch_size"],
        seed=config["seed"],
        device=config["device"],
    script:
        "../workflow_scripts/autointerp_evidence.py"


rule autointerp:
    """Description (prompt A), validation rounds (prompt B) and fuzzing rounds (prompt C) per
    described feature and variant; one JSON per feature and a summary (F1, detection, fuzzing,
    token usage) per variant."""
    input:
        evidence=f"{R}/autointerp/evidence",
    output:
        raw=directory(f"{R}/autointerp/raw"),
        overlay=directory(f"{R}/autointerp/overlay"),
    log:
        f"{LOGS}/report/autointerp.log",
    benchmark:
        f"{BENCH}/report/autointerp.tsv"
    conda:
        ENV
    threads: 2
    resources:
        mem_mb=4000,
        runtime=120,
    params:
        backend=AUTOINTERP_BACKEND,
        cache=f"{R}/autointerp/cache",
        seed=config["seed"],
        device=config["device"],
    script:
        "../workflow_scripts/autointerp.py"


rule autointerp_table:
    """RAW vs OVERLAY: one row per feature and variant, the side-by-side markdown table, and
    the F1 figure."""
    input:
        raw=f"{R}/autointerp/raw",
        overlay=f"{R}/autointerp/overlay",
    output:
        **figure_outputs(AUTOINTERP_FIGURES),
        table=report(
            f"{R}/tables/autointerp.csv",
            caption="../report/autointerp_table.rst",
            category="5.1 Auto-interp",
        ),
        markdown=f"{R}/tables/autointerp.md",
    log:
        f"{LOGS}/report/autointerp_table.log",
    benchmark:
        f"{BENCH}/report/autointerp_table.tsv"
    conda:
        ENV
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    script:
        "../workflow_scripts/autointerp_table.py"


rule dashboards:
    """One static HTML page per described feature and spatial or OCR set member (statistics,
    activation histogram, logit effects, samples across quantiles with token shading, heat
    maps, top heads, ablation row, descriptions and scores) and an index."""
    input:
        **autointerp_dirs(),
        evidence=f"{R}/autointerp/evidence",
        features=f"{R}/tables/features.parquet",
        heads=f"{R}/tables/attribution_top_heads.csv",
        ablation=ABLATION_TABLES["table2_csv"],
    output:
        pages=report(
            directory(f"{R}/dashboards"),
            htmlindex="index.html",
            caption="../report/dashboards.rst",
            category="5.1 Auto-interp",
        ),
    log:
        f"{LOGS}/report/dashboards.log",
    benchmark:
        f"{BENCH}/report/dashboards.tsv"
    conda:
        ENV
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    params:
        neuronpedia=neuronpedia_url,
    script:
        "../workflow_scripts/dashboards.py"


rule report:
    """results/{run}/report.html: every figure and table in the paper's order, links to the
    dashboards, the config, software versions and the jobs' timings."""
    input:
        targets=report_inputs(),
        dashboards=f"{R}/dashboards",
    output:
        html=report(REPORT_HTML, caption="../report/report.rst", category="Report"),
    log:
        f"{LOGS}/report/report.log",
    benchmark:
        f"{BENCH}/report/report.tsv"
    conda:
        ENV
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    params:
        run=RUN,
        config=config,
        benchmarks=BENCH,
        captions=f"{workflow.basedir}/report",
    script:
        "../workflow_scripts/report.py"
