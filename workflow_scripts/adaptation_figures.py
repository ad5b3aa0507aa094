from vlmdiff.logs import start_job
from vlmdiff.sae.adaptation import adaptation_figures_job

log = start_job(snakemake.log[0])
inp = snakemake.input
adaptation_figures_job(
    history_paths=list(inp.histories),
    splice_paths=list(inp.splice),
    cosine_path=inp.cosine,
    out=dict(snakemake.output.items()),
    log=log,
)
