from vlmdiff.causal.ablation import vsr_activations_job
from vlmdiff.logs import start_job

log = start_job(snakemake.log[0], snakemake.threads)
inp, p = snakemake.input, snakemake.params
vsr_activations_job(
    vlm_dir=inp.vlm,
    vsr_path=inp.vsr,
    selected_path=inp.selected,
    sae_dirs=dict(zip(p.layers, inp.saes, strict=True)),
    contrast=p.contrast,
    max_features=p.max_features,
    template=p.template,
    batch_size=p.batch_size,
    device=p.device,
    out=dict(snakemake.output.items()),
    log=log,
)
