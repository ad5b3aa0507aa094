from vlmdiff.logs import start_job
from vlmdiff.sae.splice import splice_baseline_job

log = start_job(snakemake.log[0], snakemake.threads)
p = snakemake.params
splice_baseline_job(
    vlm_dir=snakemake.input.vlm,
    val_path=snakemake.input.val,
    layers=p.layers,
    samples=p.samples,
    batch_size=p.batch_size,
    seed=p.seed,
    device=p.device,
    targets=p.targets,
    out=dict(snakemake.output.items()),
    log=log,
)
