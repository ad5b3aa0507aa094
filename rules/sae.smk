# Base SAEs: trained on the LM (toy presets) or a Llama-Scope release re-instantiated as TopK
# (paper preset); either way one folder per layer in our layout, read by adapt_sae.
if TRAIN_SAES:

    rule train_base_sae:
        """Base SAE for one layer of the language model (the Llama-Scope analog), random init."""
        input:
            train=cache_stores("lm", "corpus"),
            val=cache_stores("lm", "val"),
        output:
            sae=directory(f"{R}/sae/base/layer_{{layer}}"),
            history=f"{R}/sae/base/layer_{{layer}}.history.csv",
        log:
            f"{LOGS}/sae/base_layer_{{layer}}.log",
        benchmark:
            f"{BENCH}/sae/base_layer_{{layer}}.tsv"
        wildcard_constraints:
            layer=r"\d+",
        conda:
            ENV
        threads: 1
        resources:
            mem_mb=3000,
            runtime=120,
            gpu=1,
        params:
            train=config["sae"]["base"],
            k=config["sae"]["k"],
            expansion=config["sae"]["expansion"],
            eval_tokens=config["sae"]["eval_tokens"],
            seed=config["seed"],
            device=config["device"],
        script:
            "../workflow_scripts/train_base_sae.py"

else:

    rule import_base_sae:
        """One layer of the Llama-Scope release: dataset-wise norms and decoder norms folded
        into a TopK SAE with sae.k latents, hook point checked against the layer."""
        input:
            check=MODEL_CHECK,
        output:
            sae=directory(f"{R}/sae/base/layer_{{layer}}"),
        log:
            f"{LOGS}/sae/import_base_layer_{{layer}}.log",
        benchmark:
            f"{BENCH}/sae/import_base_layer_{{layer}}.tsv"
        wildcard_constraints:
            layer=r"\d+",
        conda:
            ENV
        threads: 1
        resources:
            mem_mb=4000,
            runtime=30,
        params:
            source=SOURCE,
            k=config["sae"]["k"],
        script:
            "../workflow_scripts/import_base_sae.py"


rule adapt_sae:
    """Adapt the base SAE of one layer to the VLM's activations under one regime."""
    input:
        base=f"{R}/sae/base/layer_{{layer}}",
        train=cache_stores("vlm", "train"),
        val=cache_stores("vlm", "val"),
    output:
        sae=directory(f"{R}/sae/{{regime}}/layer_{{layer}}"),
        history=f"{R}/sae/{{regime}}/layer_{{layer}}.history.csv",
    log:
        f"{LOGS}/sae/{{regime}}_layer_{{layer}}.log",
    benchmark:
        f"{BENCH}/sae/{{regime}}_layer_{{layer}}.tsv"
    wildcard_constraints:
        regime="full|image|text|random",
        layer=r"\d+",
    conda:
        ENV
    threads: 1
    resources:
        mem_mb=3000,
        runtime=120,
        gpu=1,
    params:
        train=config["sae"]["adapt"],
        k=config["sae"]["k"],
        eval_tokens=config["sae"]["eval_tokens"],
        seed=config["seed"],
        device=config["device"],
        checkpoint_dir=adapt_checkpoint_dir,
    script:
        "../workflow_scripts/adapt_sae.py"


rule export_saes:
    """Every layer's SAE of one regime (base included) in SAELens's and sparsify's on-disk
    formats, the input scale folded into the weights; with sae.export.jumprelu, the imported
    Llama-Scope layers also with the release's own JumpReLU."""
    input:
        saes=regime_sae_dirs,
    output:
        exports=directory(f"{R}/exports/{{regime}}"),
    log:
        f"{LOGS}/exports/{{regime}}.log",
    benchmark:
        f"{BENCH}/exports/{{regime}}.tsv"
    wildcard_constraints:
        regime="base|full|image|text|random",
    conda:
        ENV
    threads: 1
    resources:
        mem_mb=6000,
        runtime=30,
    params:
        layers=LAYERS,
        jumprelu=export_jumprelu,
        model_name=export_model_name,
    script:
        "../workflow_scripts/export_saes.py"


rule splice_baseline:
    """Clean and zero-ablated CE per layer on the splice sample, shared by every regime."""
    input:
        vlm=f"{R}/models/vlm_stage2",
        val=world_file("val"),
    output:
        table=f"{R}/sae/splice_baseline.csv",
    log:
        f"{LOGS}/sae/splice_baseline.log",
    benchmark:
        f"{BENCH}/sae/splice_baseline.tsv"
    conda:
        ENV
    threads: 4
    resources:
        mem_mb=4000,
        runtime=60,
        gpu=1,
    params:
        samples=config["sae"]["splice"]["samples"],
        batch_size=config["sae"]["splice"]["batch_size"],
        targets=config["sae"]["splice"]["targets"],
        layers=LAYERS,
        seed=config["seed"],
        device=config["device"],
    script:
        "../workflow_scripts/splice_baseline.py"


rule splice_eval:
    """CE loss recovered and KL with each layer's adapted SAE spliced into the VLM."""
    input:
        vlm=f"{R}/models/vlm_stage2",
        val=world_file("val"),
        saes=regime_sae_dirs,
        baseline=f"{R}/sae/splice_baseline.csv",
    output:
        table=f"{R}/sae/{{regime}}/splice.csv",
    log:
        f"{LOGS}/sae/splice_{{regime}}.log",
    benchmark:
        f"{BENCH}/sae/splice_{{regime}}.tsv"
    wildcard_constraints:
        regime="full|image|text|random",
    conda:
        ENV
    threads: 4
    resources:
        mem_mb=4000,
        runtime=60,
        gpu=1,
    params:
        samples=config["sae"]["splice"]["samples"],
        batch_size=config["sae"]["splice"]["batch_size"],
        targets=config["sae"]["splice"]["targets"],
        layers=LAYERS,
        seed=config["seed"],
        device=config["device"],
    script:
        "../workflow_scripts/splice_eval.py"


rule decoder_cosine:
    """Per-feature cosine between base and adapted decoder columns, every layer and regime."""
    input:
        base=expand(f"{R}/sae/base/layer_{{layer}}", layer=LAYERS),
        adapted=expand(f"{R}/sae/{{regime}}/layer_{{layer}}", regime=REGIMES, layer=LAYERS),
    output:
        netcdf=f"{R}/sae/decoder_cosine.nc",
    log:
        f"{LOGS}/sae/decoder_cosine.log",
    benchmark:
        f"{BENCH}/sae/decoder_cosine.tsv"
    conda:
        ENV
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    params:
        layers=LAYERS,
        regimes=REGIMES,
    script:
        "../workflow_scripts/decoder_cosine.py"


rule adaptation_figures:
    """Figures 1, 5, 6 and the adaptation tables."""
    input:
        histories=expand(
            f"{R}/sae/{{regime}}/layer_{{layer}}.history.csv", regime=REGIMES, layer=LAYERS
        ),
        splice=expand(f"{R}/sae/{{regime}}/splice.csv", regime=REGIMES),
        cosine=f"{R}/sae/decoder_cosine.nc",
    output:
        fig1=report_output(f"{R}/figures/fig1_fvu_adaptation.png"),
        fig1_pdf=f"{R}/figures/fig1_fvu_adaptation.pdf",
        fig5=report_output(f"{R}/figures/fig5_decoder_cosine.png"),
        fig5_pdf=f"{R}/figures/fig5_decoder_cosine.pdf",
        fig6=report_output(f"{R}/figures/fig6_fvu_per_layer.png"),
        fig6_pdf=f"{R}/figures/fig6_fvu_per_layer.pdf",
        summary=f"{R}/tables/fvu_summary.csv",
        table=f"{R}/tables/sae_adaptation.csv",
    log:
        f"{LOGS}/adaptation_figures.log",
    benchmark:
        f"{BENCH}/adaptation_figures.tsv"
    conda:
        ENV
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    script:
        "../workflow_scripts/adaptation_figures.py"
