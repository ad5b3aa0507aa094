from vlmdiff.features.ground_truth import ground_truth_job
from vlmdiff.logs import start_job

log = start_job(snakemake.log[0])
inp, p = snakemake.input, snakemake.params
ground_truth_job(
    table_path=inp.features,
    stats_paths=list(inp.stats),
    val_path=inp.val,
    contrasts=p.contrasts,
    n_random=p.random_features,
    seed=p.seed,
    out=dict(snakemake.output.items()),
    log=log,
)
