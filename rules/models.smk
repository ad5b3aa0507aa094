# Stage 1 models. Toy presets: trained by the workflow. Paper preset: imported and converted
# (vlmdiff.sources.llava_more) into the same folders, after a check that model and SAEs fit.
if TRAIN_MODELS:

    rule train_lm:
        """Pretrain the toy Llama LM (and its word-level tokenizer) on the scene corpus."""
        input:
            corpus=world_file("corpus"),
            train=world_file("train"),
            vsr=world_file("vsr"),
            neutral_prompts=f"{R}/world/neutral_prompts.json",
        output:
            model=directory(f"{R}/models/lm"),
            history=f"{R}/models/lm_history.csv",
        log:
            f"{LOGS}/train_lm.log",
        benchmark:
            f"{BENCH}/train_lm.tsv"
        conda:
            ENV
        threads: 4
        resources:
            mem_mb=6000,
            runtime=60,
            gpu=1,
        params:
            lm=config["lm"],
            scene=config["world"]["scene"],
            seed=config["seed"],
            device=config["device"],
        script:
            "../workflow_scripts/train_lm.py"

    rule pretrain_vision:
        """Pretrain the CLIP vision tower on per-patch object, letter and position targets (our
        stand-in for CLIP's web-scale pretraining)."""
        input:
            train=world_file("train"),
        output:
            model=directory(f"{R}/models/vision"),
            history=f"{R}/models/vision_history.csv",
            metrics=f"{R}/models/vision_metrics.json",
        log:
            f"{LOGS}/pretrain_vision.log",
        benchmark:
            f"{BENCH}/pretrain_vision.tsv"
        conda:
            ENV
        threads: 4
        resources:
            mem_mb=4000,
            runtime=30,
            gpu=1,
        params:
            vision=config["vision"],
            scene=config["world"]["scene"],
            image_size=config["world"]["scene"]["image_size"],
            seed=config["seed"],
            device=config["device"],
        script:
            "../workflow_scripts/pretrain_vision.py"

    rule train_vlm_stage1:
        """LLaVA stage 1: vision tower + projector trained, language model frozen."""
        input:
            lm=f"{R}/models/lm",
            vision=f"{R}/models/vision",
            train=world_file("train"),
        output:
            model=directory(f"{R}/models/vlm_stage1"),
            history=f"{R}/models/vlm_stage1_history.csv",
        log:
            f"{LOGS}/train_vlm_stage1.log",
        benchmark:
            f"{BENCH}/train_vlm_stage1.tsv"
        conda:
            ENV
        threads: 4
        resources:
            mem_mb=8000,
            runtime=60,
            gpu=1,
        params:
            vision=config["vision"],
            position_code=config["vlm"]["image_position_code"],
            position_scale=config["vlm"]["image_position_scale"],
            optim=config["vlm"]["stage1"],
            scene=config["world"]["scene"],
            image_size=config["world"]["scene"]["image_size"],
            seed=config["seed"],
            device=config["device"],
        script:
            "../workflow_scripts/train_vlm_stage1.py"

    rule train_vlm_stage2:
        """LLaVA stage 2: everything trained, the language model included."""
        input:
            previous=f"{R}/models/vlm_stage1",
            train=world_file("train"),
        output:
            model=directory(f"{R}/models/vlm_stage2"),
            history=f"{R}/models/vlm_stage2_history.csv",
        log:
            f"{LOGS}/train_vlm_stage2.log",
        benchmark:
            f"{BENCH}/train_vlm_stage2.tsv"
        conda:
            ENV
        threads: 4
        resources:
            mem_mb=8000,
            runtime=60,
            gpu=1,
        params:
            optim=config["vlm"]["stage2"],
            scene=config["world"]["scene"],
            seed=config["seed"] + 1,
            device=config["device"],
        script:
            "../workflow_scripts/train_vlm_stage2.py"

    rule eval_models:
        """Held-out accuracy per question family, and of the spatial questions per relation: LM
        alone (no image), LM given the scene in words, VLM stage 1, VLM stage 2; colour and
        shape answers split into correct, another object's attribute, and not in the scene; and
        how linearly each VLM's image tokens encode their patch's column and row, layer by layer.
        """
        input:
            lm=f"{R}/models/lm",
            stage1=f"{R}/models/vlm_stage1",
            stage2=f"{R}/models/vlm_stage2",
            val=world_file("val"),
        output:
            table=f"{R}/models/vlm_eval.csv",
            plot=report_output(f"{R}/models/vlm_eval.png"),
            plot_pdf=f"{R}/models/vlm_eval.pdf",
            relations=f"{R}/models/vlm_eval_relations.csv",
            relations_plot=report_output(f"{R}/models/vlm_eval_relations.png"),
            relations_pdf=f"{R}/models/vlm_eval_relations.pdf",
            errors=f"{R}/models/vlm_eval_errors.csv",
            errors_plot=report_output(f"{R}/models/vlm_eval_errors.png"),
            errors_pdf=f"{R}/models/vlm_eval_errors.pdf",
            positions=f"{R}/models/vlm_eval_positions.csv",
            positions_plot=report_output(f"{R}/models/vlm_eval_positions.png"),
            positions_pdf=f"{R}/models/vlm_eval_positions.pdf",
        log:
            f"{LOGS}/eval_models.log",
        benchmark:
            f"{BENCH}/eval_models.tsv"
        conda:
            ENV
        threads: 4
        resources:
            mem_mb=4000,
            runtime=30,
            gpu=1,
        params:
            batch_size=config["eval"]["batch_size"],
            position_images=config["eval"]["position_images"],
            scene=config["world"]["scene"],
            device=config["device"],
        script:
            "../workflow_scripts/eval_models.py"

else:

    rule check_sources:
        """Model config against the config's layer count and every layer's SAE (d_model, hook
        point), from their JSON files only: a mismatch stops the run before any GPU job."""
        output:
            check=MODEL_CHECK,
        log:
            f"{LOGS}/check_sources.log",
        benchmark:
            f"{BENCH}/check_sources.tsv"
        conda:
            ENV
        threads: 1
        resources:
            mem_mb=1000,
            runtime=10,
        params:
            source=SOURCE,
            layers=LAYERS,
            config_layers=config["lm"]["num_layers"],
        script:
            "../workflow_scripts/check_sources.py"

    rule import_vlm:
        """The fine-tuned VLM as an HF Llava folder (original-LLaVA checkpoints converted)."""
        input:
            check=MODEL_CHECK,
        output:
            model=directory(f"{R}/models/vlm_stage2"),
            summary=f"{R}/models/vlm_stage2_import.json",
        log:
            f"{LOGS}/import_vlm.log",
        benchmark:
            f"{BENCH}/import_vlm.tsv"
        conda:
            ENV
        threads: 2
        resources:
            mem_mb=48000,
            runtime=120,
        params:
            source=SOURCE["vlm"],
            key="source.vlm",
            base_lm=None,
            vision_tower=SOURCE["vision_tower"],
            revision=SOURCE["revision"],
        script:
            "../workflow_scripts/import_vlm.py"

    if SOURCE["vlm_stage1"]:

        rule import_vlm_stage1:
            """The stage-1 VLM: its projector with the base LM's weights (LLaVA's pretrain
            checkpoints hold only the projector)."""
            input:
                check=MODEL_CHECK,
            output:
                model=directory(f"{R}/models/vlm_stage1"),
                summary=f"{R}/models/vlm_stage1_import.json",
            log:
                f"{LOGS}/import_vlm_stage1.log",
            benchmark:
                f"{BENCH}/import_vlm_stage1.tsv"
            conda:
                ENV
            threads: 2
            resources:
                mem_mb=48000,
                runtime=120,
            params:
                source=SOURCE["vlm_stage1"],
                key="source.vlm_stage1",
                base_lm=SOURCE["lm"],
                vision_tower=SOURCE["vision_tower"],
                revision=SOURCE["revision"],
            script:
                "../workflow_scripts/import_vlm.py"

    if SOURCE["lm"]:

        rule import_lm:
            """The base language model, copied as an HF Llama folder."""
            output:
                model=directory(f"{R}/models/lm"),
            log:
                f"{LOGS}/import_lm.log",
            benchmark:
                f"{BENCH}/import_lm.tsv"
            conda:
                ENV
            threads: 1
            resources:
                mem_mb=4000,
                runtime=60,
            params:
                source=SOURCE["lm"],
                revision=SOURCE["revision"],
            script:
                "../workflow_scripts/import_lm.py"
