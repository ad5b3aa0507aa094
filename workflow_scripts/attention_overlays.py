from vlmdiff.causal.overlays import OverlaySettings, attention_overlays_job
from vlmdiff.logs import start_job

log = start_job(snakemake.log[0], snakemake.threads)
inp, p, o = snakemake.input, snakemake.params, snakemake.params.overlays
attention_overlays_job(
    vlm_dir=inp.vlm,
    attribution_path=inp.scores,
    val_path=inp.val,
    vsr_path=inp.vsr,
    stats_paths=list(inp.stats),
    vsr_acts_path=inp.acts,
    settings=OverlaySettings(
        variant=p.variant,
        n_heads=o["n_heads"],
        samples_per_source=o["samples_per_source"],
        top_vsr=p.top_vsr,
        min_relation_share=p.min_relation_share,
        template=p.template,
        custom_queries=o["custom_queries"],
        unrelated_queries=o["unrelated_queries"],
        custom_images=o["custom_images"],
        object_samples=o["object_samples"],
        device=p.device,
    ),
    out=dict(snakemake.output.items()),
    log=log,
)
