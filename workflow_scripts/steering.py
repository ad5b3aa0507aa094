from vlmdiff.causal.ablation import eval_setup
from vlmdiff.causal.steering import steering_job
from vlmdiff.logs import start_job

log = start_job(snakemake.log[0], snakemake.threads)
p = dict(snakemake.params.items())
inputs, settings = eval_setup(dict(snakemake.input.items()), p)
steering_job(
    inputs=inputs,
    settings=settings,
    vqa_samples=p["steering"]["vqa_samples"],
    alphas=p["steering"]["alphas"],
    seed=p["seed"],
    out=dict(snakemake.output.items()),
    log=log,
)
