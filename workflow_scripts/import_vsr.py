from vlmdiff.data import write_json
from vlmdiff.llava_more import resolve_source
from vlmdiff.logs import job_logger
from vlmdiff.real_data import import_vsr

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
