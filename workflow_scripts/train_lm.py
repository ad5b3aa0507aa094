from vlmdiff.logs import start_job
from vlmdiff.models.training import train_lm_job

log = start_job(snakemake.log[0], snakemake.threads)
inp, p = snakemake.input, snakemake.params
train_lm_job(
    corpus_path=inp.corpus,
    train_path=inp.train,
    vsr_path=inp.vsr,
    prompts_path=inp.neutral_prompts,
    lm=p.lm,
    scene=p.scene,
    seed=p.seed,
    device=p.device,
    out=dict(snakemake.output.items()),
    log=log,
)
