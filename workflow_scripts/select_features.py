from vlmdiff.features.selection import read_verdicts, selection_job
from vlmdiff.files import write_table
from vlmdiff.logs import job_logger

inp, out, p = snakemake.input, snakemake.output, snakemake.params
tables = selection_job(
    list(inp.stats),
    inp.cosine,
    {c: read_verdicts(path) for c, path in zip(p.contrasts, inp.lexical, strict=True)},
    regime=p.regime,
    frequency=p.frequency,
    p_cos=p.p_cos,
    eps=p.eps,
    n_selected=p.n_selected,
    contrasts={c: p.thresholds[c] for c in p.contrasts},
    log=job_logger(snakemake.log[0]),
)
for name in ("features", "selected"):
    write_table(tables[name], out[f"{name}_parquet"])
    write_table(tables[name], out[f"{name}_csv"])
write_table(tables["sets"], out.sets)
write_table(tables["per_layer"], out.per_layer)
