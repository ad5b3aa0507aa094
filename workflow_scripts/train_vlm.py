import pandas as pd
import torch
from vlmdiff.data import load_split
from vlmdiff.logs import job_logger
from vlmdiff.models import build_vlm, load_lm, load_vlm, make_processor, resolve_device, save_atomic
from vlmdiff.training import train_vlm_stage

log = job_logger(snakemake.log[0])
torch.set_num_threads(snakemake.threads)
inp, p = snakemake.input, snakemake.params
device = resolve_device(p.device)
if hasattr(inp, "lm"):  # stage 1 starts from the pretrained LM
    stage = 1
    lm, tokenizer = load_lm(inp.lm)
    vlm = build_vlm(lm, tokenizer, p.vision, p.image_size, p.seed)
    processor = make_processor(tokenizer, p.image_size, p.vision["patch_size"])
else:
    stage = 2
    vlm, processor = load_vlm(inp.previous)
history = train_vlm_stage(
    vlm, processor, load_split(inp.train), stage, p.optim, p.seed, device, log,
    scene_cfg=p.scene if stage == 1 else None,
)
save_atomic([vlm.cpu(), processor], snakemake.output.model)
pd.DataFrame(history).to_csv(snakemake.output.history, index=False)
