import torch
from vlmdiff.files import write_table
from vlmdiff.logs import job_logger
from vlmdiff.sae.splice import splice_baseline_job

torch.set_num_threads(snakemake.threads)
p = snakemake.params
table = splice_baseline_job(
    snakemake.input.vlm,
    snakemake.input.val,
    p.layers,
    samples=p.samples,
    batch_size=p.batch_size,
    seed=p.seed,
    device=p.device,
    targets=p.targets,
    log=job_logger(snakemake.log[0]),
)
write_table(table, snakemake.output.table)
