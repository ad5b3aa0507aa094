rule world:
    """Draw the shapes world: VQAv2-layout splits, a VSR-layout set, neutral prompts, LM corpus."""
    output:
        **{split: world_file(split) for split in WORLD_SPLITS},
        neutral_prompts=f"{R}/world/neutral_prompts.json",
        summary=f"{R}/world/summary.json",
    params:
        scene=config["world"]["scene"],
        sizes=config["world"]["sizes"],
        questions_per_image=config["world"]["questions_per_image"],
        spatial_keywords=config["filters"]["spatial_keywords"],
        ocr_keywords=config["filters"]["ocr_keywords"],
        neutral_prompts=config["neutral_prompts"],
        seed=config["seed"],
    log:
        f"{LOGS}/world.log",
    benchmark:
        f"{BENCH}/world.tsv"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=30,
    conda:
        ENV
    script:
        "../workflow_scripts/world.py"
