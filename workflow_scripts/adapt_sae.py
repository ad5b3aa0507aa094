import torch
from vlmdiff.logs import job_logger
from vlmdiff.sae.adaptation import adapt, train_config

torch.set_num_threads(snakemake.threads)
p, inp, out, w = snakemake.params, snakemake.input, snakemake.output, snakemake.wildcards
layer = int(w.layer)
history = adapt(
    layer,
    w.regime,
    inp.base,
    inp.train,
    inp.val,
    train_config(p.train, "sae.adapt", p.k, p.seed + layer, p.device),
    p.eval_tokens,
    out.sae,
    p.checkpoint_dir,
    log=job_logger(snakemake.log[0]),
)
history.to_csv(out.history, index=False)
