from vlmdiff.logs import start_job
from vlmdiff.models.vision import pretrain_vision_job

log = start_job(snakemake.log[0], snakemake.threads)
p = snakemake.params
pretrain_vision_job(
    train_path=snakemake.input.train,
    vision=p.vision,
    scene=p.scene,
    image_size=p.image_size,
    seed=p.seed,
    device=p.device,
    out=dict(snakemake.output.items()),
    log=log,
)
