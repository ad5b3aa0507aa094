# Stage 0: the world. Shapes: drawn by the workflow. Paper: VQAv2 and VSR imported into the
# same split files (lmms-lab/VQAv2 and cambridgeltl/vsr_* column layouts).
if SHAPES_WORLD:

    rule world:
        """Draw the shapes world: VQAv2-layout splits, a VSR-layout set, neutral prompts, LM corpus."""
        output:
            **{split: world_file(split) for split in WORLD_SPLITS},
            neutral_prompts=f"{R}/world/neutral_prompts.json",
            summary=f"{R}/world/summary.json",
        log:
            f"{LOGS}/world.log",
        benchmark:
            f"{BENCH}/world.tsv"
        conda:
            ENV
        threads: 1
        resources:
            mem_mb=4000,
            runtime=30,
        params:
            scene=config["world"]["scene"],
            sizes=config["world"]["sizes"],
            questions_per_image=config["world"]["questions_per_image"],
            val_family_weights=config["world"]["val_family_weights"],
            spatial_keywords=config["filters"]["spatial_keywords"],
            ocr_keywords=config["filters"]["ocr_keywords"],
            neutral_prompts=config["neutral_prompts"],
            seed=config["seed"],
        script:
            "../workflow_scripts/world.py"

else:

    rule import_vqav2:
        """VQAv2 in the lmms-lab layout: adaptation samples (train), D_base (val), and its
        spatial and OCR questions by the same keyword filters as the shapes world."""
        output:
            **{split: world_file(split) for split in ["train", "val", "spatial", "ocr"]},
            neutral_prompts=f"{R}/world/neutral_prompts.json",
            summary=f"{R}/world/vqav2_summary.json",
        log:
            f"{LOGS}/import_vqav2.log",
        benchmark:
            f"{BENCH}/import_vqav2.tsv"
        conda:
            ENV
        threads: 2
        resources:
            mem_mb=16000,
            runtime=240,
        params:
            vqav2=SOURCE["vqav2"],
            revision=SOURCE["revision"],
            spatial_keywords=config["filters"]["spatial_keywords"],
            ocr_keywords=config["filters"]["ocr_keywords"],
            neutral_prompts=config["neutral_prompts"],
            seed=config["seed"],
        script:
            "../workflow_scripts/import_vqav2.py"

    rule import_vsr:
        """VSR captions joined to their COCO images; missing images fail or are skipped."""
        output:
            vsr=world_file("vsr"),
            summary=f"{R}/world/vsr_summary.json",
        log:
            f"{LOGS}/import_vsr.log",
        benchmark:
            f"{BENCH}/import_vsr.tsv"
        conda:
            ENV
        threads: 1
        resources:
            mem_mb=8000,
            runtime=60,
        params:
            vsr=SOURCE["vsr"],
            revision=SOURCE["revision"],
            seed=config["seed"],
        script:
            "../workflow_scripts/import_vsr.py"
