import torch
from vlmdiff.features.stats import feature_stats_job
from vlmdiff.files import write_netcdf
from vlmdiff.logs import job_logger

torch.set_num_threads(snakemake.threads)
inp, p = snakemake.input, snakemake.params
stats = feature_stats_job(
    inp.sae,
    int(snakemake.wildcards.layer),
    {split: list(inp[split]) for split in p.splits},
    batch_tokens=p.batch_tokens,
    n_top=p.top_samples,
    device=p.device,
    log=job_logger(snakemake.log[0]),
)
write_netcdf(stats, snakemake.output.stats)
