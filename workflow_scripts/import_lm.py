from vlmdiff.logs import start_job
from vlmdiff.sources.llava_more import import_lm_job

log = start_job(snakemake.log[0])
p = snakemake.params
import_lm_job(source=p.source, revision=p.revision, out=dict(snakemake.output.items()), log=log)
