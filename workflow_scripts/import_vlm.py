from vlmdiff.logs import start_job
from vlmdiff.sources.llava_more import import_vlm_job

log = start_job(snakemake.log[0])
p = snakemake.params
import_vlm_job(
    source=p.source,
    key=p.key,
    revision=p.revision,
    vision_tower=p.vision_tower,
    base_lm=p.base_lm,
    out=dict(snakemake.output.items()),
    log=log,
)
