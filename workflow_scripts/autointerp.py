import torch
from vlmdiff.interp.autointerp import autointerp_job
from vlmdiff.logs import job_logger

torch.set_num_threads(snakemake.threads)
p, out = snakemake.params, snakemake.output
autointerp_job(
    snakemake.input.evidence, {"raw": out.raw, "overlay": out.overlay}, p.cache, p.backend,
    seed=p.seed, device=p.device, log=job_logger(snakemake.log[0]),
)
