from pathlib import Path

from vlmdiff.interp.report import build_report
from vlmdiff.logs import job_logger

inp, p = snakemake.input, snakemake.params
html = build_report(
    list(inp.targets), Path(snakemake.output.html).parent, snakemake.output.html, run=p.run,
    config=p.config, benchmarks_dir=p.benchmarks,
    captions_dir=p.captions, dashboards_dir=inp.dashboards,
)
job_logger(snakemake.log[0])(f"{html}: {len(inp.targets)} output(s) of the run")
