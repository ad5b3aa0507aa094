import torch
from vlmdiff.cache.write import cache_split
from vlmdiff.logs import job_logger

torch.set_num_threads(snakemake.threads)
p = snakemake.params
cache_split(
    snakemake.input.model,
    snakemake.input.split,
    snakemake.output.store,
    mode=p.mode,
    text_source=p.text_source,
    max_samples=p.max_samples,
    shard=tuple(p.shard),
    cache_cfg=p.cache,
    max_len=p.max_len,
    seed=p.seed,
    device=p.device,
    log=job_logger(snakemake.log[0]),
)
