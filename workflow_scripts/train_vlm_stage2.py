from vlmdiff.logs import start_job
from vlmdiff.models.training import train_vlm_stage2_job

log = start_job(snakemake.log[0], snakemake.threads)
inp, p = snakemake.input, snakemake.params
train_vlm_stage2_job(
    previous_dir=inp.previous,
    train_path=inp.train,
    optim=p.optim,
    scene=p.scene,
    seed=p.seed,
    device=p.device,
    out=dict(snakemake.output.items()),
    log=log,
)
