from vlmdiff.logs import start_job
from vlmdiff.sae.adaptation import decoder_cosine_job

log = start_job(snakemake.log[0])
p, inp = snakemake.params, snakemake.input
decoder_cosine_job(
    layers=p.layers,
    regimes=p.regimes,
    base_dirs=list(inp.base),
    adapted_dirs=list(inp.adapted),
    out=dict(snakemake.output.items()),
    log=log,
)
