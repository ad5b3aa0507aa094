from vlmdiff.logs import job_logger
from vlmdiff.sources.check import import_sae

p = snakemake.params
import_sae(p.source, int(snakemake.wildcards.layer), p.k, snakemake.output.sae,
           log=job_logger(snakemake.log[0]))
