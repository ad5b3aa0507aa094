import torch
from vlmdiff.causal.ablation import ablation_job, eval_config
from vlmdiff.causal.tables import write_ablation_tables
from vlmdiff.logs import job_logger

torch.set_num_threads(snakemake.threads)
inputs, cfg = eval_config(snakemake.input, snakemake.params)
a = snakemake.params.ablation
runs = ablation_job(
    inputs, cfg, vqa_samples=a["vqa_samples"], subset_fraction=a["subset_fraction"],
    n_controls=a["n_controls"], seeds=a["seeds"], log=job_logger(snakemake.log[0]),
)
write_ablation_tables(runs, snakemake.output, snakemake.params.contrast)
