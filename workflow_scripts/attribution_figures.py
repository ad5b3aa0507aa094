from vlmdiff.causal.figures import attribution_figures_job
from vlmdiff.logs import start_job

log = start_job(snakemake.log[0])
p = snakemake.params
attribution_figures_job(
    scores_path=snakemake.input.scores,
    variant=p.variant,
    n_heads=p.n_heads,
    out=dict(snakemake.output.items()),
    log=log,
)
