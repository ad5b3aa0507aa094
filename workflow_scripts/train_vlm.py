import pandas as pd
import torch
from vlmdiff.logs import job_logger
from vlmdiff.models.build import resolve_device, save_atomic
from vlmdiff.models.training import start_vlm_stage, train_vlm_stage
from vlmdiff.world.layouts import load_split

log = job_logger(snakemake.log[0])
torch.set_num_threads(snakemake.threads)
inp, p = snakemake.input, snakemake.params
vlm, processor, stage = start_vlm_stage(
    getattr(inp, "lm", None), getattr(inp, "previous", None),
    getattr(p, "vision", None), getattr(p, "image_size", None), p.seed,
    vision_dir=getattr(inp, "vision", None),
)
history = train_vlm_stage(
    vlm, processor, load_split(inp.train), stage, p.optim, p.seed, resolve_device(p.device), log,
    scene_cfg=p.scene,
)
save_atomic([vlm.cpu(), processor], snakemake.output.model)
pd.DataFrame(history).to_csv(snakemake.output.history, index=False)
