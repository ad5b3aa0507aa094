from vlmdiff.features.selection import select_features_job
from vlmdiff.logs import start_job

log = start_job(snakemake.log[0])
inp, p = snakemake.input, snakemake.params
select_features_job(
    stats_paths=list(inp.stats),
    cosine_path=inp.cosine,
    lexical_paths=list(inp.lexical),
    contrasts=p.contrasts,
    thresholds=p.thresholds,
    regime=p.regime,
    frequency=p.frequency,
    p_cos=p.p_cos,
    eps=p.eps,
    n_selected=p.n_selected,
    out=dict(snakemake.output.items()),
    log=log,
)
