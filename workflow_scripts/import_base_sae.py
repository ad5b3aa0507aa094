from vlmdiff.logs import start_job
from vlmdiff.sources.check import import_base_sae_job

log = start_job(snakemake.log[0])
p = snakemake.params
import_base_sae_job(
    source=p.source,
    layer=int(snakemake.wildcards.layer),
    k=p.k,
    out=dict(snakemake.output.items()),
    log=log,
)
