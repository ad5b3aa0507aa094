import torch
from vlmdiff.causal.ablation import eval_config
from vlmdiff.causal.figures import fig_steering
from vlmdiff.causal.steering import steering_job
from vlmdiff.files import write_table
from vlmdiff.logs import job_logger
from vlmdiff.plots import save

torch.set_num_threads(snakemake.threads)
out, p = snakemake.output, snakemake.params
inputs, cfg = eval_config(snakemake.input, p)
table = steering_job(inputs, cfg, vqa_samples=p.steering["vqa_samples"],
                     alphas=p.steering["alphas"], seed=p.seed, log=job_logger(snakemake.log[0]))
write_table(table, out.table)
save(fig_steering(table), out.steering, out.steering_pdf)
