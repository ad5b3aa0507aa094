from vlmdiff.files import atomic_path, write_table
from vlmdiff.interp.autointerp import (
    f1_comparison,
    fig_autointerp_f1,
    markdown_table,
    read_records,
    records_table,
)
from vlmdiff.logs import job_logger
from vlmdiff.plots import save

inp, out = snakemake.input, snakemake.output
table = records_table(read_records(inp.raw) + read_records(inp.overlay))
wide = f1_comparison(table)
write_table(table, out.table)
with atomic_path(out.markdown) as tmp:
    tmp.write_text(markdown_table(wide))
save(fig_autointerp_f1(wide), out.fig_autointerp, out.fig_autointerp_pdf)
job_logger(snakemake.log[0])(markdown_table(wide).splitlines()[-1])
