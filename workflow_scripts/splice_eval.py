from vlmdiff.logs import start_job
from vlmdiff.sae.splice import splice_eval_job

log = start_job(snakemake.log[0], snakemake.threads)
inp, p = snakemake.input, snakemake.params
splice_eval_job(
    vlm_dir=inp.vlm,
    val_path=inp.val,
    sae_dirs=dict(zip(p.layers, inp.saes, strict=True)),
    regime=snakemake.wildcards.regime,
    samples=p.samples,
    batch_size=p.batch_size,
    seed=p.seed,
    device=p.device,
    baseline_path=inp.baseline,
    targets=p.targets,
    out=dict(snakemake.output.items()),
    log=log,
)
