import torch
from vlmdiff.causal.ablation import vsr_activation_job
from vlmdiff.files import write_netcdf
from vlmdiff.logs import job_logger

torch.set_num_threads(snakemake.threads)
inp, p = snakemake.input, snakemake.params
acts = vsr_activation_job(
    inp.vlm, inp.vsr, inp.selected, dict(zip(p.layers, inp.saes, strict=True)),
    contrast=p.contrast, max_features=p.max_features, template=p.template,
    batch_size=p.batch_size, device=p.device, log=job_logger(snakemake.log[0]),
)
write_netcdf(acts, snakemake.output.acts)
