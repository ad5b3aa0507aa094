from vlmdiff.causal.ablation import ablation_job, eval_setup
from vlmdiff.logs import start_job

log = start_job(snakemake.log[0], snakemake.threads)
p = dict(snakemake.params.items())
inputs, settings = eval_setup(dict(snakemake.input.items()), p)
a = p["ablation"]
ablation_job(
    inputs=inputs,
    settings=settings,
    vqa_samples=a["vqa_samples"],
    subset_fraction=a["subset_fraction"],
    n_controls=a["n_controls"],
    seeds=a["seeds"],
    out=dict(snakemake.output.items()),
    log=log,
)
