from vlmdiff.logs import start_job
from vlmdiff.world.datasets import world_job

log = start_job(snakemake.log[0])
p = snakemake.params
world_job(
    scene=p.scene,
    seed=p.seed,
    sizes=p.sizes,
    questions_per_image=p.questions_per_image,
    val_family_weights=p.val_family_weights,
    spatial_keywords=p.spatial_keywords,
    ocr_keywords=p.ocr_keywords,
    neutral_prompts=p.neutral_prompts,
    out=dict(snakemake.output.items()),
    log=log,
)
