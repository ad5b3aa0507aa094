import xarray as xr
from vlmdiff.causal.figures import (
    fig12_attribution_layers,
    fig13_attribution_heads,
    fig_patching_check,
    top_head_summary,
)
from vlmdiff.files import write_table
from vlmdiff.logs import job_logger
from vlmdiff.plots import save

out, p = snakemake.output, snakemake.params
ds = xr.load_dataset(snakemake.input.scores)
save(fig12_attribution_layers(ds, p.variant), out.fig12, out.fig12_pdf)
save(fig13_attribution_heads(ds, p.variant), out.fig13, out.fig13_pdf)
save(fig_patching_check(ds), out.check, out.check_pdf)
write_table(top_head_summary(ds, p.variant, p.n_heads), out.heads)
job_logger(snakemake.log[0])(f"figures 12, 13 and the patching check for {ds.sizes['feature']} features")
