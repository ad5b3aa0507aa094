import pandas as pd
from vlmdiff.features.selection import threshold_sweep
from vlmdiff.files import write_table
from vlmdiff.logs import job_logger

p = snakemake.params
table = pd.read_parquet(snakemake.input.features)
sweep = threshold_sweep(table, p.sweep["p_cos"], p.sweep["eps"], p_cos=p.p_cos, eps=p.eps)
job_logger(snakemake.log[0])("\n" + sweep.to_string(index=False))
write_table(sweep, snakemake.output.table)
