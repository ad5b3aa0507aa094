import json

import pandas as pd
import torch
from vlmdiff.logs import job_logger
from vlmdiff.models.build import resolve_device, save_atomic
from vlmdiff.models.training import pretrain_lm
from vlmdiff.world.layouts import load_split

log = job_logger(snakemake.log[0])
torch.set_num_threads(snakemake.threads)
inp, p = snakemake.input, snakemake.params
with open(inp.neutral_prompts) as fh:
    prompts = json.load(fh)
model, tokenizer, history = pretrain_lm(
    load_split(inp.corpus), load_split(inp.train), load_split(inp.vsr), prompts,
    p.scene, p.lm, p.seed, resolve_device(p.device), log,
)
save_atomic([model, tokenizer], snakemake.output.model)
pd.DataFrame(history).to_csv(snakemake.output.history, index=False)
