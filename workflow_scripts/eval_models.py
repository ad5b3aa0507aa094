from vlmdiff.logs import start_job
from vlmdiff.models.evaluation import eval_models_job

log = start_job(snakemake.log[0], snakemake.threads)
inp, p = snakemake.input, snakemake.params
eval_models_job(
    lm_dir=inp.lm,
    stage1_dir=inp.stage1,
    stage2_dir=inp.stage2,
    val_path=inp.val,
    batch_size=p.batch_size,
    position_images=p.position_images,
    scene=p.scene,
    device=p.device,
    out=dict(snakemake.output.items()),
    log=log,
)
