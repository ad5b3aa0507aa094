import torch
from vlmdiff.causal.attribution import attribution_job
from vlmdiff.files import write_netcdf, write_table
from vlmdiff.logs import job_logger

torch.set_num_threads(snakemake.threads)
inp, p, cfg = snakemake.input, snakemake.params, snakemake.params.attribution
scores, check = attribution_job(
    inp.vlm, inp.val, list(inp.stats), inp.selected, dict(zip(p.layers, inp.saes, strict=True)),
    inp.mean, contrast=p.contrast, max_features=p.max_features, top_k=cfg["top_k"],
    batch_size=cfg["batch_size"], atp_star=cfg["atp_star"], exact=cfg["exact_check"],
    device=p.device, log=job_logger(snakemake.log[0]),
)
write_netcdf(scores, snakemake.output.scores)
write_table(check, snakemake.output.check)
