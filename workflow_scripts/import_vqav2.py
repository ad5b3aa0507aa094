from pathlib import Path

from vlmdiff.logs import job_logger
from vlmdiff.sources.llava_more import resolve_source
from vlmdiff.sources.vqa_vsr import import_vqav2, vqav2_patterns
from vlmdiff.world.datasets import write_json

p, out = snakemake.params, snakemake.output
v = p.vqav2
root = resolve_source(v["path"], "source.vqav2.path", revision=p.revision,
                      allow_patterns=vqav2_patterns([v["adapt_split"], v["base_split"]]))
summary = import_vqav2(
    root,
    Path(out.train).parent,
    adapt_split=v["adapt_split"],
    adapt_samples=v["adapt_samples"],
    base_split=v["base_split"],
    base_samples=v["base_samples"],
    contrast_samples=v["contrast_samples"],
    spatial_keywords=p.spatial_keywords,
    ocr_keywords=p.ocr_keywords,
    seed=p.seed,
    log=job_logger(snakemake.log[0]),
)
write_json(list(p.neutral_prompts), out.neutral_prompts)
write_json(summary, out.summary)
