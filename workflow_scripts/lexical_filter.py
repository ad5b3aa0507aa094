import torch
from vlmdiff.features.lexical import lexical_job
from vlmdiff.files import write_table
from vlmdiff.logs import job_logger

torch.set_num_threads(snakemake.threads)
inp, p = snakemake.input, snakemake.params
table = lexical_job(
    inp.vlm,
    inp.split,
    list(inp.stats),
    dict(zip(p.layers, inp.saes, strict=True)),
    snakemake.wildcards.contrast,
    thresholds=p.thresholds,
    frequency=p.frequency,
    prompts=p.prompts,
    n_samples=p.lexical["samples"],
    min_fraction=p.lexical["min_fraction"],
    batch_size=p.lexical["batch_size"],
    device=p.device,
    log=job_logger(snakemake.log[0]),
)
write_table(table, snakemake.output.table)
