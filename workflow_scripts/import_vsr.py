from vlmdiff.logs import job_logger
from vlmdiff.sources.llava_more import resolve_source
from vlmdiff.sources.vqa_vsr import import_vsr
from vlmdiff.world.datasets import write_json

p, out = snakemake.params, snakemake.output
v = p.vsr
source = resolve_source(v["path"], "source.vsr.path", revision=p.revision, allow_patterns=["*.jsonl"])
summary = import_vsr(
    source,
    v["coco_images"],
    out.vsr,
    split=v["split"],
    samples=v["samples"],
    missing_images=v["missing_images"],
    seed=p.seed,
    log=job_logger(snakemake.log[0]),
)
write_json(summary, out.summary)
