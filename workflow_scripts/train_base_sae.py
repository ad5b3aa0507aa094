import torch
from vlmdiff.logs import job_logger
from vlmdiff.sae.adaptation import train_base, train_config

torch.set_num_threads(snakemake.threads)
p, out = snakemake.params, snakemake.output
layer = int(snakemake.wildcards.layer)
history = train_base(
    layer,
    snakemake.input.train,
    snakemake.input.val,
    train_config(p.train, "sae.base", p.k, p.seed + layer, p.device),
    p.expansion,
    p.eval_tokens,
    out.sae,
    out.sae + ".checkpoint",
    log=job_logger(snakemake.log[0]),
)
history.to_csv(out.history, index=False)
