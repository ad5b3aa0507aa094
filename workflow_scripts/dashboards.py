from vlmdiff.interp.dashboards import build_dashboards
from vlmdiff.logs import job_logger

inp = snakemake.input
named = dict(inp.items())
# no RAW / OVERLAY folders when auto-interp is switched off (autointerp.backend: none)
variants = {v: named[v] for v in ("raw", "overlay") if v in named}
pages = build_dashboards(
    inp.evidence, variants, inp.features, inp.heads, inp.ablation, snakemake.output.pages,
)
job_logger(snakemake.log[0])(f"{len(pages)} feature dashboard(s) and an index")
