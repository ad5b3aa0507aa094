import torch
from vlmdiff.files import atomic_dir
from vlmdiff.interp.evidence import evidence_job
from vlmdiff.logs import job_logger

torch.set_num_threads(snakemake.threads)
inp, p = snakemake.input, snakemake.params
with atomic_dir(snakemake.output.evidence) as tmp:
    evidence_job(
        inp.vlm, inp.val, inp.spatial, inp.vsr, list(inp.stats), inp.selected,
        dict(zip(p.layers, inp.saes, strict=True)), inp.scores, tmp, contrasts=p.contrasts,
        max_features=p.max_features, k=p.k, holdout=p.holdout, negatives=p.negatives,
        negative_max_fraction=p.negative_max_fraction, n_heads=p.n_heads, variant=p.variant,
        template=p.template, batch_size=p.batch_size, seed=p.seed, device=p.device,
        log=job_logger(snakemake.log[0]),
    )
