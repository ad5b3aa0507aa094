from vlmdiff.causal.attribution import attribution_job
from vlmdiff.logs import start_job

log = start_job(snakemake.log[0], snakemake.threads)
inp, p, cfg = snakemake.input, snakemake.params, snakemake.params.attribution
attribution_job(
    vlm_dir=inp.vlm,
    val_path=inp.val,
    stats_paths=list(inp.stats),
    selected_path=inp.selected,
    sae_dirs=dict(zip(p.layers, inp.saes, strict=True)),
    mean_path=inp.mean,
    contrast=p.contrast,
    max_features=p.max_features,
    top_k=cfg["top_k"],
    batch_size=cfg["batch_size"],
    atp_star=cfg["atp_star"],
    exact=cfg["exact_check"],
    device=p.device,
    out=dict(snakemake.output.items()),
    log=log,
)
