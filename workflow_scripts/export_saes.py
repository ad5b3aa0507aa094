from vlmdiff.logs import start_job
from vlmdiff.sae.export import export_saes_job

log = start_job(snakemake.log[0], snakemake.threads)
p = snakemake.params
export_saes_job(
    layers=p.layers,
    sae_dirs=list(snakemake.input.saes),
    jumprelu=p.jumprelu,
    model_name=p.model_name,
    out=dict(snakemake.output.items()),
    log=log,
)
