from pathlib import Path

from vlmdiff.logs import job_logger
from vlmdiff.world.datasets import write_world

p = snakemake.params
write_world(
    p.scene,
    p.seed,
    Path(snakemake.output.summary).parent,
    n_train=p.sizes["train"],
    n_val=p.sizes["val"],
    n_vsr=p.sizes["vsr"],
    n_corpus=p.sizes["corpus"],
    questions_per_image=p.questions_per_image,
    spatial_keywords=p.spatial_keywords,
    ocr_keywords=p.ocr_keywords,
    neutral_prompts=p.neutral_prompts,
    log=job_logger(snakemake.log[0]),
)
