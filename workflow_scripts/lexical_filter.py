from vlmdiff.features.lexical import lexical_filter_job
from vlmdiff.logs import start_job

log = start_job(snakemake.log[0], snakemake.threads)
inp, p = snakemake.input, snakemake.params
lexical_filter_job(
    vlm_dir=inp.vlm,
    split_path=inp.split,
    stats_paths=list(inp.stats),
    sae_dirs=dict(zip(p.layers, inp.saes, strict=True)),
    contrast=snakemake.wildcards.contrast,
    thresholds=p.thresholds,
    frequency=p.frequency,
    prompts=p.prompts,
    n_samples=p.lexical["samples"],
    min_fraction=p.lexical["min_fraction"],
    batch_size=p.lexical["batch_size"],
    device=p.device,
    out=dict(snakemake.output.items()),
    log=log,
)
