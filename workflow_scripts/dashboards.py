from vlmdiff.dashboards import build_dashboards
from vlmdiff.logs import job_logger

inp = snakemake.input
pages = build_dashboards(
    inp.evidence, {"raw": inp.raw, "overlay": inp.overlay}, inp.features, inp.heads,
    inp.ablation, snakemake.output.pages,
)
job_logger(snakemake.log[0])(f"{len(pages)} feature dashboard(s) and an index")
