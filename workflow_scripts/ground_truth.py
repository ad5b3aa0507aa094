from vlmdiff.features.ground_truth import ground_truth_job
from vlmdiff.files import write_table
from vlmdiff.logs import job_logger

inp, out, p = snakemake.input, snakemake.output, snakemake.params
per_feature, summary = ground_truth_job(
    inp.features,
    list(inp.stats),
    inp.val,
    p.contrasts,
    n_random=p.random_features,
    seed=p.seed,
    log=job_logger(snakemake.log[0]),
)
write_table(per_feature, out.per_feature)
write_table(summary, out.summary)
