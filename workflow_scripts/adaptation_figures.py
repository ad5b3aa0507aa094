import pandas as pd
import xarray as xr
from vlmdiff.logs import job_logger
from vlmdiff.plots import fig1_fvu_curves, fig5_decoder_cosine, fig6_fvu_per_layer, save
from vlmdiff.sae.adaptation import final_table, read_histories, regime_summary

log = job_logger(snakemake.log[0])
inp, out = snakemake.input, snakemake.output
histories = read_histories(inp.histories)
splice = pd.concat([pd.read_csv(p) for p in inp.splice], ignore_index=True)
table = final_table(histories, splice)
summary = regime_summary(table)
table.to_csv(out.table, index=False)
summary.to_csv(out.summary, index=False)
log("\n" + summary.to_string(index=False))
save(fig1_fvu_curves(histories, summary), out.fig1, out.fig1_pdf)
with xr.open_dataarray(inp.cosine) as cos:
    save(fig5_decoder_cosine(cos.load()), out.fig5, out.fig5_pdf)
save(fig6_fvu_per_layer(histories), out.fig6, out.fig6_pdf)
