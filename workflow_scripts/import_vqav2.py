from vlmdiff.logs import start_job
from vlmdiff.sources.vqa_vsr import import_vqav2_job

log = start_job(snakemake.log[0])
p = snakemake.params
import_vqav2_job(
    vqav2=p.vqav2,
    revision=p.revision,
    spatial_keywords=p.spatial_keywords,
    ocr_keywords=p.ocr_keywords,
    neutral_prompts=p.neutral_prompts,
    seed=p.seed,
    out=dict(snakemake.output.items()),
    log=log,
)
