from vlmdiff.logs import start_job
from vlmdiff.models.training import train_vlm_stage1_job

log = start_job(snakemake.log[0], snakemake.threads)
inp, p = snakemake.input, snakemake.params
train_vlm_stage1_job(
    lm_dir=inp.lm,
    vision_dir=inp.vision,
    train_path=inp.train,
    vision=p.vision,
    position_code=p.position_code,
    position_scale=p.position_scale,
    image_size=p.image_size,
    optim=p.optim,
    scene=p.scene,
    seed=p.seed,
    device=p.device,
    out=dict(snakemake.output.items()),
    log=log,
)
