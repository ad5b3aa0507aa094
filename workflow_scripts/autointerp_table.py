from vlmdiff.interp.autointerp_table import autointerp_table_job
from vlmdiff.logs import start_job

log = start_job(snakemake.log[0])
inp = snakemake.input
autointerp_table_job(
    raw_dir=inp.raw, overlay_dir=inp.overlay, out=dict(snakemake.output.items()), log=log
)
