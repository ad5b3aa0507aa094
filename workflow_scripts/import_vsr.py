from vlmdiff.logs import start_job
from vlmdiff.sources.vqa_vsr import import_vsr_job

log = start_job(snakemake.log[0])
p = snakemake.params
import_vsr_job(
    vsr=p.vsr, revision=p.revision, seed=p.seed, out=dict(snakemake.output.items()), log=log
)
