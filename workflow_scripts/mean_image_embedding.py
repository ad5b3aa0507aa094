import torch
from vlmdiff.causal.attribution import mean_embedding_job
from vlmdiff.files import write_netcdf
from vlmdiff.logs import job_logger

torch.set_num_threads(snakemake.threads)
p = snakemake.params
mean = mean_embedding_job(snakemake.input.vlm, snakemake.input.split, samples=p.samples,
                          batch_size=p.batch_size, seed=p.seed, device=p.device,
                          log=job_logger(snakemake.log[0]))
write_netcdf(mean, snakemake.output.mean)
