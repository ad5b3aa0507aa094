from vlmdiff.interp.autointerp import autointerp_job
from vlmdiff.logs import start_job

log = start_job(snakemake.log[0], snakemake.threads)
p = snakemake.params
autointerp_job(
    evidence_dir=snakemake.input.evidence,
    out=dict(snakemake.output.items()),
    cache_dir=p.cache,
    cfg=p.backend,
    seed=p.seed,
    device=p.device,
    log=log,
)
