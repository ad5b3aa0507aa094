from vlmdiff.causal.attribution import mean_image_embedding_job
from vlmdiff.logs import start_job

log = start_job(snakemake.log[0], snakemake.threads)
p = snakemake.params
mean_image_embedding_job(
    vlm_dir=snakemake.input.vlm,
    split_path=snakemake.input.split,
    samples=p.samples,
    batch_size=p.batch_size,
    seed=p.seed,
    device=p.device,
    out=dict(snakemake.output.items()),
    log=log,
)
