from vlmdiff.interp.report import report_job
from vlmdiff.logs import start_job

log = start_job(snakemake.log[0])
inp, p = snakemake.input, snakemake.params
report_job(
    targets=list(inp.targets),
    dashboards_dir=inp.dashboards,
    run=p.run,
    config=p.config,
    benchmarks_dir=p.benchmarks,
    captions_dir=p.captions,
    out=dict(snakemake.output.items()),
    log=log,
)
