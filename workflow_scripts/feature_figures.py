from vlmdiff.features.selection import feature_figures_job
from vlmdiff.logs import start_job

log = start_job(snakemake.log[0])
inp, p = snakemake.input, snakemake.params
feature_figures_job(
    table_path=inp.features,
    per_layer_path=inp.per_layer,
    sweep_path=inp.sweep,
    p_cos=p.p_cos,
    eps=p.eps,
    thresholds=p.thresholds,
    out=dict(snakemake.output.items()),
    log=log,
)
