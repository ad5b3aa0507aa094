from vlmdiff.logs import start_job
from vlmdiff.sources.check import check_sources_job

log = start_job(snakemake.log[0])
p = snakemake.params
check_sources_job(
    source=p.source,
    layers=p.layers,
    config_layers=p.config_layers,
    out=dict(snakemake.output.items()),
    log=log,
)
