import torch
from vlmdiff.files import write_table
from vlmdiff.logs import job_logger
from vlmdiff.sae.splice import splice_job

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
    targets=p.targets,
    baseline_path=snakemake.input.baseline,
    log=job_logger(snakemake.log[0]),
)
write_table(table, snakemake.output.table)
