import torch
from vlmdiff.logs import job_logger
from vlmdiff.models.build import load_lm, load_vlm, resolve_device
from vlmdiff.models.evaluation import (
    accuracy_table,
    attribute_errors,
    image_token_positions,
    predict_models,
    relation_table,
)
from vlmdiff.models.vision import unique_images
from vlmdiff.plots import accuracy_bars, error_bars, position_lines, save
from vlmdiff.world.layouts import load_split

log = job_logger(snakemake.log[0])
torch.set_num_threads(snakemake.threads)
inp, out, p = snakemake.input, snakemake.output, snakemake.params
device = resolve_device(p.device)
val = load_split(inp.val)
lm, tokenizer = load_lm(inp.lm, device)
vlms = {"vlm stage 1": load_vlm(inp.stage1, device), "vlm stage 2": load_vlm(inp.stage2, device)}
preds = predict_models(val, lm, tokenizer, vlms, device, p.batch_size, p.scene)
table, relations = accuracy_table(val, preds), relation_table(val, preds)
table.to_csv(out.table, index=False)
relations.to_csv(out.relations, index=False)
errors = attribute_errors(val, preds)
errors.to_csv(out.errors, index=False)
log(f"\n{table.to_string(index=False)}\n\nspatial, per relation:\n"
    f"{relations.to_string(index=False)}\n\ncolour and shape answers:\n"
    f"{errors.round(3).to_string(index=False)}")
save(accuracy_bars(table, "Held-out accuracy per question family"), out.plot, out.plot_pdf)
title = "Spatial questions: held-out accuracy per relation"
save(accuracy_bars(relations, title, ("relation", "answer_type")), out.relations_plot,
     out.relations_pdf)
save(error_bars(errors, "Colour and shape answers: correct, or another object's attribute"),
     out.errors_plot, out.errors_pdf)
images = unique_images(val)
images = images.select(range(min(p.position_images, len(images))))["image"]
positions = image_token_positions(vlms, images, device)
positions.to_csv(out.positions, index=False)
log(f"\nimage tokens, R^2 of their patch's column and row:\n{positions.round(3).to_string(index=False)}")
save(position_lines(positions, "Image tokens: how linearly they encode their patch's place"),
     out.positions_plot, out.positions_pdf)
