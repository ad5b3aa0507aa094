from vlmdiff.interp.dashboards import dashboards_job
from vlmdiff.logs import start_job

log = start_job(snakemake.log[0])
inp = snakemake.input
# no RAW / OVERLAY folders when auto-interp is switched off (autointerp.backend: none)
named = dict(inp.items())
dashboards_job(
    evidence_dir=inp.evidence,
    features_path=inp.features,
    heads_path=inp.heads,
    ablation_path=inp.ablation,
    raw_dir=named.get("raw"),
    overlay_dir=named.get("overlay"),
    out=dict(snakemake.output.items()),
    neuronpedia=snakemake.params.neuronpedia,
    log=log,
)
