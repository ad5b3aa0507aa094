from vlmdiff.logs import start_job
from vlmdiff.sae.adaptation import adapt_sae_job

log = start_job(snakemake.log[0], snakemake.threads)
inp, p, w = snakemake.input, snakemake.params, snakemake.wildcards
adapt_sae_job(
    layer=int(w.layer),
    regime=w.regime,
    base_dir=inp.base,
    train_paths=list(inp.train),
    eval_paths=list(inp.val),
    train=p.train,
    k=p.k,
    eval_tokens=p.eval_tokens,
    seed=p.seed,
    device=p.device,
    checkpoint_dir=p.checkpoint_dir,
    out=dict(snakemake.output.items()),
    log=log,
)
