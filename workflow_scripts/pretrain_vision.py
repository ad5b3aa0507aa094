import pandas as pd
import torch
from vlmdiff.logs import job_logger
from vlmdiff.models.build import (
    build_vision_tower,
    make_image_processor,
    resolve_device,
    save_atomic,
)
from vlmdiff.models.vision import pretrain_vision
from vlmdiff.world.datasets import write_json
from vlmdiff.world.layouts import load_split

log = job_logger(snakemake.log[0])
torch.set_num_threads(snakemake.threads)
p, out = snakemake.params, snakemake.output
tower = build_vision_tower(p.vision, p.image_size, p.seed)
history, metrics = pretrain_vision(
    tower, load_split(snakemake.input.train), make_image_processor(p.image_size), p.scene,
    p.vision["pretrain"], p.seed, resolve_device(p.device), log,
)
save_atomic([tower.cpu()], out.model)
pd.DataFrame(history).to_csv(out.history, index=False)
write_json(metrics, out.metrics)
