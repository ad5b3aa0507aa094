from vlmdiff.features.stats import feature_stats_job
from vlmdiff.logs import start_job

log = start_job(snakemake.log[0], snakemake.threads)
inp, p = snakemake.input, snakemake.params
feature_stats_job(
    sae_dir=inp.sae,
    layer=int(snakemake.wildcards.layer),
    caches={split: list(inp[split]) for split in p.splits},
    batch_tokens=p.batch_tokens,
    n_top=p.top_samples,
    device=p.device,
    out=dict(snakemake.output.items()),
    log=log,
)
