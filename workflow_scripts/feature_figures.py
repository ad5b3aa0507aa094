import pandas as pd
from vlmdiff.logs import job_logger
from vlmdiff.plots import (
    fig2_feature_selection,
    fig7_adapted_per_layer,
    fig8_threshold_sweep,
    fig9_firing_frequency,
    fig10_ocr_features,
    save,
)

inp, out, p = snakemake.input, snakemake.output, snakemake.params
table = pd.read_parquet(inp.features)
save(fig2_feature_selection(table, p.eps, p.p_cos), out.fig2, out.fig2_pdf)
save(fig7_adapted_per_layer(pd.read_csv(inp.per_layer)), out.fig7, out.fig7_pdf)
save(fig8_threshold_sweep(pd.read_csv(inp.sweep)), out.fig8, out.fig8_pdf)
save(fig9_firing_frequency(table), out.fig9, out.fig9_pdf)
save(fig10_ocr_features(table, p.eps, p.thresholds["ocr"]), out.fig10, out.fig10_pdf)
job_logger(snakemake.log[0])(f"figures 2, 7, 8, 9, 10 from {len(table)} features")
