from vlmdiff.logs import start_job
from vlmdiff.sae.adaptation import train_base_sae_job

log = start_job(snakemake.log[0], snakemake.threads)
inp, p = snakemake.input, snakemake.params
train_base_sae_job(
    layer=int(snakemake.wildcards.layer),
    train_paths=list(inp.train),
    eval_paths=list(inp.val),
    train=p.train,
    k=p.k,
    expansion=p.expansion,
    eval_tokens=p.eval_tokens,
    seed=p.seed,
    device=p.device,
    out=dict(snakemake.output.items()),
    log=log,
)
