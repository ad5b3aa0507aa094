import torch
from vlmdiff.logs import job_logger
from vlmdiff.splice import splice_job

torch.set_num_threads(snakemake.threads)
p = snakemake.params
table = splice_job(
    snakemake.input.vlm,
    snakemake.input.val,
    dict(zip(p.layers, snakemake.input.saes, strict=True)),
    snakemake.wildcards.regime,
    samples=p.samples,
    batch_size=p.batch_size,
    seed=p.seed,
    device=p.device,
    log=job_logger(snakemake.log[0]),
)
table.to_csv(snakemake.output.table, index=False)
