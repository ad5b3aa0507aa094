from vlmdiff.logs import job_logger
from vlmdiff.sae.adaptation import decoder_cosines

log = job_logger(snakemake.log[0])
p, inp = snakemake.params, snakemake.input
base = dict(zip(p.layers, inp.base, strict=True))
pairs = [(r, layer) for r in p.regimes for layer in p.layers]
cos = decoder_cosines(base, dict(zip(pairs, inp.adapted, strict=True)))
cos.to_netcdf(snakemake.output.netcdf)
log(cos.mean("feature").to_pandas().round(3).to_string())
