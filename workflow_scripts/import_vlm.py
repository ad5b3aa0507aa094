from vlmdiff.logs import job_logger
from vlmdiff.sources.llava_more import import_vlm
from vlmdiff.world.datasets import write_json

p, out = snakemake.params, snakemake.output
summary = import_vlm(
    p.source,
    out.model,
    key=p.key,
    revision=p.revision,
    vision_tower=p.vision_tower,
    base_lm=p.base_lm,
    log=job_logger(snakemake.log[0]),
)
write_json(summary, out.summary)
