rule cache_activations:
    """One forward pass of a model over one (split, shard): every decoder block's output, zarr."""
    input:
        model=cache_model_dir,
        split=cache_split_file,
    output:
        store=directory(f"{R}/cache/{{model}}/{{split}}/shard{{shard}}.zarr"),
    log:
        f"{LOGS}/cache/{{model}}_{{split}}_shard{{shard}}.log",
    benchmark:
        f"{BENCH}/cache/{{model}}_{{split}}_shard{{shard}}.tsv"
    wildcard_constraints:
        model="lm|vlm",
        split="|".join(CACHE_SPLITS),
        shard=r"\d+",
    conda:
        ENV
    threads: 4
    resources:
        mem_mb=6000,
        runtime=120,
        gpu=1,
    params:
        mode=cache_mode,
        text_source=cache_text_source,
        max_samples=cache_max_samples,
        shard=cache_shard,
        cache=config["cache"],
        max_len=config["lm"]["max_len"],
        seed=config["seed"],
        device=config["device"],
    script:
        "../workflow_scripts/cache_activations.py"
