from vlmdiff.cache.write import cache_activations_job
from vlmdiff.logs import start_job

log = start_job(snakemake.log[0], snakemake.threads)
p = snakemake.params
cache_activations_job(
    model_dir=snakemake.input.model,
    split_path=snakemake.input.split,
    mode=p.mode,
    text_source=p.text_source,
    max_samples=p.max_samples,
    shard=tuple(p.shard),
    cache_cfg=p.cache,
    max_len=p.max_len,
    seed=p.seed,
    device=p.device,
    out=dict(snakemake.output.items()),
    log=log,
)
