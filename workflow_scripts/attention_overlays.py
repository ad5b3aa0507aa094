import torch
from vlmdiff.causal.overlays import overlay_job
from vlmdiff.logs import job_logger
from vlmdiff.plots import save

torch.set_num_threads(snakemake.threads)
inp, out, p = snakemake.input, snakemake.output, snakemake.params
figures = overlay_job(
    inp.vlm, inp.scores, inp.val, inp.vsr, list(inp.stats), inp.acts, variant=p.variant,
    n_heads=p.overlays["n_heads"], samples_per_source=p.overlays["samples_per_source"],
    top_vsr=p.top_vsr, min_relation_share=p.min_relation_share, template=p.template,
    custom_queries=p.overlays["custom_queries"], unrelated_queries=p.overlays["unrelated_queries"],
    custom_images=p.overlays["custom_images"], device=p.device, log=job_logger(snakemake.log[0]),
)
for key in ("fig4", "fig14", "fig15", "fig16"):
    save(figures[key], out[key], out[f"{key}_pdf"])
