from vlmdiff.causal.ablation import EvalInputs, EvalSettings, ablation_job
from vlmdiff.logs import start_job

log = start_job(snakemake.log[0], snakemake.threads)
inp, p, a = snakemake.input, snakemake.params, snakemake.params.ablation
ablation_job(
    inputs=EvalInputs(
        vlm_dir=inp.vlm,
        vsr_path=inp.vsr,
        val_path=inp.val,
        selected_path=inp.selected,
        features_path=inp.features,
        sae_dirs=dict(zip(p.layers, inp.saes, strict=True)),
        vsr_acts_path=inp.acts,
    ),
    settings=EvalSettings(
        contrast=p.contrast,
        max_features=p.max_features,
        template=p.template,
        top_vsr=a["top_vsr"],
        min_relation_share=a["min_relation_share"],
        positions=a["positions"],
        batch_size=a["batch_size"],
        device=p.device,
    ),
    vqa_samples=a["vqa_samples"],
    subset_fraction=a["subset_fraction"],
    n_controls=a["n_controls"],
    seeds=a["seeds"],
    out=dict(snakemake.output.items()),
    log=log,
)
