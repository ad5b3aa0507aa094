from vlmdiff.logs import job_logger
from vlmdiff.sources.llava_more import import_lm

p = snakemake.params
import_lm(p.source, snakemake.output.model, revision=p.revision, log=job_logger(snakemake.log[0]))
