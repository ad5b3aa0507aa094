from vlmdiff.logs import job_logger
from vlmdiff.sources.check import check_sources, write_check

p = snakemake.params
result = check_sources(p.source, p.layers, p.config_layers)
job_logger(snakemake.log[0])(f"sources fit: {result}")
write_check(result, snakemake.output.check)
