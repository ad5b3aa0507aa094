from vlmdiff.interp.evidence_job import EvidenceSettings, autointerp_evidence_job
from vlmdiff.logs import start_job

log = start_job(snakemake.log[0], snakemake.threads)
inp, p = snakemake.input, snakemake.params
autointerp_evidence_job(
    vlm_dir=inp.vlm,
    val_path=inp.val,
    spatial_path=inp.spatial,
    vsr_path=inp.vsr,
    stats_paths=list(inp.stats),
    selected_path=inp.selected,
    features_path=inp.features,
    sae_dirs=dict(zip(p.layers, inp.saes, strict=True)),
    attribution_path=inp.scores,
    settings=EvidenceSettings(
        contrasts=p.contrasts,
        max_features=p.max_features,
        k=p.k,
        holdout=p.holdout,
        quantiles=p.quantiles,
        hard_negatives=p.hard_negatives,
        negatives=p.negatives,
        negative_max_fraction=p.negative_max_fraction,
        n_heads=p.n_heads,
        variant=p.variant,
        template=p.template,
        batch_size=p.batch_size,
        seed=p.seed,
        device=p.device,
        set_members=p.pages["set_members"],
        quantile_bins=p.pages["quantile_bins"],
        per_bin=p.pages["per_bin"],
        histogram_bins=p.pages["histogram_bins"],
    ),
    out=dict(snakemake.output.items()),
    log=log,
)
