from vlmdiff.features.selection import threshold_sweep_job
from vlmdiff.logs import start_job

log = start_job(snakemake.log[0])
p = snakemake.params
threshold_sweep_job(
    table_path=snakemake.input.features,
    sweep=p.sweep,
    p_cos=p.p_cos,
    eps=p.eps,
    out=dict(snakemake.output.items()),
    log=log,
)
