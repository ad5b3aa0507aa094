"""Training loops for the toy LM (text pretraining) and the two LLaVA-style VLM stages."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from datasets import Dataset
from transformers import LlavaProcessor, PreTrainedTokenizerFast

from vlmdiff import config
from vlmdiff.inputs import (
    Encoded,
    collate,
    encode_corpus,
    encode_vqa,
    image_groups,
)
from vlmdiff.logs import Log
from vlmdiff.models.build import (
    build_lm,
    build_vlm,
    load_lm,
    load_vision_tower,
    load_vlm,
    make_processor,
    projector,
    resolve_device,
    save_atomic,
)
from vlmdiff.models.curriculum import curriculum_batches, phases
from vlmdiff.models.tokenizer import build_tokenizer
from vlmdiff.world.layouts import load_split
from vlmdiff.world.scenes import Scene, WorldConfig, describe


@dataclass(frozen=True)
class OptimConfig:
    """Step-based AdamW with linear warm-up and cosine decay: the shared keys of the `lm.train`,
    `vision.pretrain` and `vlm.stage1/2` sections, whose defaults and ranges are the schema's."""

    steps: int
    batch_size: int
    lr: float
    warmup_steps: int
    weight_decay: float
    grad_clip: float
    log_every: int
    length_pool: int

    @classmethod
    def from_mapping(cls, d: Mapping[str, Any] | None, where: str) -> OptimConfig:
        """From the config section `where` (e.g. "lm.train"), checked against the schema with
        that section's defaults filled in; its other keys (loss_on, data, ...) are left out."""
        return config.build(cls, where, d)


CAPTION_PROMPT = "describe the image ."


def caption_text(scene_json: str, world: WorldConfig) -> str:
    """The scene's description with objects in reading order (top to bottom, left to right)."""
    scene = Scene.from_dict(json.loads(scene_json))
    ordered = Scene(tuple(sorted(scene.objects, key=lambda o: (o.y, o.x))), scene.image_size)
    return describe(ordered, world)


def with_captions(ds: Dataset, scene_cfg: Mapping[str, Any], keep_questions: bool = False) -> Dataset:
    """Each image with its description as the answer to `CAPTION_PROMPT`.

    Like LLaVA's feature-alignment stage (image -> caption), this gives the from-scratch
    vision tower a dense signal in the words the LM learnt in pretraining. One caption per
    image (rows sharing an `image_id` are one image); with `keep_questions` the caption row is
    followed by the image's question rows, so `encode_vqa` makes one conversation that opens
    with the description.
    """
    groups = image_groups(ds["image_id"] if "image_id" in ds.column_names else range(len(ds)))
    rows, is_caption = [], []
    for a, b in groups:
        rows.append(a)
        is_caption.append(True)
        if keep_questions:
            rows += range(a, b)
            is_caption += [False] * (b - a)
    part = ds.select(rows)
    questions, answers, scenes = part["question"], part["multiple_choice_answer"], part["scene"]
    world = WorldConfig.from_mapping(scene_cfg)
    return Dataset.from_dict(
        {
            "image": part["image"],
            "image_id": part["image_id"] if "image_id" in ds.column_names else rows,
            "question": [CAPTION_PROMPT if c else q for c, q in zip(is_caption, questions, strict=True)],
            "multiple_choice_answer": [
                caption_text(sc, world) if c else a
                for c, a, sc in zip(is_caption, answers, scenes, strict=True)
            ],
        },
    ).cast_column("image", ds.features["image"])


def batches(
    data: Encoded, batch_size: int, pad_id: int, seed: int, length_pool: int = 1
) -> Iterator[dict[str, torch.Tensor]]:
    """Endless right-padded mini-batches, reshuffled each epoch.

    With `length_pool` > 1 each run of `length_pool` batches of the shuffled order is sorted by
    sequence length before it is cut into batches, and those batches come in random order: the
    same samples per epoch, far less padding (the toy corpus pads ~30 % with plain batches).
    """
    if len(data) < batch_size:
        raise ValueError(f"{len(data)} sequences to train on, fewer than one batch of {batch_size}")
    rng = np.random.default_rng(seed)
    if length_pool <= 1:
        while True:
            order = rng.permutation(len(data))
            for start in range(0, len(order) - batch_size + 1, batch_size):
                yield collate(data, order[start : start + batch_size], pad_id)
    lengths = np.array([len(ids) for ids in data.input_ids])
    pool = batch_size * length_pool
    while True:
        order = rng.permutation(len(data))
        for start in range(0, len(order) - batch_size + 1, pool):
            chunk = order[start : start + pool]
            chunk = chunk[np.argsort(lengths[chunk], kind="stable")]
            starts = range(0, len(chunk) - batch_size + 1, batch_size)
            groups = [chunk[i : i + batch_size] for i in starts]
            for g in rng.permutation(len(groups)):
                yield collate(data, groups[g], pad_id)


def train(
    model: torch.nn.Module,
    params: Sequence[torch.nn.Parameter],
    batch_iter: Iterator[dict[str, torch.Tensor]],
    cfg: OptimConfig,
    device: torch.device,
    tag: str,
    log: Log = print,
    on_log: Callable[[int], dict[str, float] | None] | None = None,
) -> list[dict[str, float]]:
    """Run `cfg.steps` optimiser steps; returns the logged loss history.

    `on_log(step)`, when given, runs at every log step with the model in eval mode (e.g. a
    held-out evaluation); the values it returns join that step's history row.
    """
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _warmup_cosine(cfg.warmup_steps, cfg.steps))
    model.train()
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    history: list[dict[str, float]] = []
    t0, running, seen = time.perf_counter(), 0.0, 0
    for step in range(1, cfg.steps + 1):
        batch = {k: v.to(device) for k, v in next(batch_iter).items()}
        with autocast:
            loss = model(**batch).loss
        if not torch.isfinite(loss):
            raise FloatingPointError(f"{tag}: loss is {loss.item()} at step {step}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        sched.step()
        running += loss.item()
        seen += next(iter(batch.values())).shape[0]  # every tensor of a batch is per sample
        if step % cfg.log_every == 0 or step == cfg.steps:
            elapsed = time.perf_counter() - t0
            n = cfg.log_every if step % cfg.log_every == 0 else step % cfg.log_every
            rate = seen / elapsed
            eta = (cfg.steps - step) * elapsed / step
            history.append({"step": step, "loss": running / n, "samples_per_s": rate})
            log(
                f"{tag} step {step}/{cfg.steps} loss {running / n:.4f} "
                f"lr {sched.get_last_lr()[0]:.2e} {rate:.1f} samples/s eta {eta:.0f}s"
            )
            running = 0.0
            if on_log is not None:
                paused = time.perf_counter()
                model.eval()
                history[-1].update(on_log(step) or {})
                model.train()
                t0 += time.perf_counter() - paused  # rates and ETAs count training time only
    model.eval()
    return history


def _warmup_cosine(warmup: int, total: int) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


def set_stage_trainable(vlm: torch.nn.Module, stage: int, train_vision: bool = True) -> list:
    """LLaVA's recipe: stage 1 trains the projector (+ our from-scratch tower), stage 2 all."""
    for p in vlm.parameters():
        p.requires_grad_(stage == 2)
    if stage == 1:
        modules = [projector(vlm)]
        if train_vision:
            modules.append(vlm.model.vision_tower)
        for m in modules:
            for p in m.parameters():
                p.requires_grad_(True)
    return [p for p in vlm.parameters() if p.requires_grad]


def vocabulary_texts(
    corpus: Dataset, vqa: Dataset, vsr: Dataset, prompts: Sequence[str], scene_cfg: Mapping
) -> Iterator[str]:
    """Every text the toy models will meet, so the word-level vocabulary covers it."""
    for row in corpus:
        yield row["description"]
        yield from row["questions"]
        yield from row["answers"]
    yield from vqa["question"]
    yield from vqa["multiple_choice_answer"]
    yield from vsr["caption"]
    yield from prompts
    letters = scene_cfg.get("letters", "abcdefghijklmnopqrstuvwxyz")
    yield " ".join([*scene_cfg.get("colours", []), *scene_cfg.get("shapes", [])])
    yield " ".join(letters.lower()) + " " + " ".join(str(i) for i in range(10)) + " yes no"


def pretrain_lm(
    corpus: Dataset,
    vqa: Dataset,
    vsr: Dataset,
    prompts: Sequence[str],
    scene_cfg: Mapping[str, Any],
    lm_cfg: Mapping[str, Any],
    seed: int,
    device: torch.device,
    log: Log = print,
) -> tuple[torch.nn.Module, PreTrainedTokenizerFast, list[dict[str, float]]]:
    """Build the tokenizer, then train a fresh Llama LM on the scene corpus."""
    tokenizer = build_tokenizer(vocabulary_texts(corpus, vqa, vsr, prompts, scene_cfg))
    log(f"vocabulary: {len(tokenizer)} tokens")
    train_cfg = config.section("lm.train", lm_cfg["train"])
    data = encode_corpus(tokenizer, corpus, lm_cfg["max_len"], train_cfg["loss_on"])
    lengths = [len(t) for t in data.input_ids]
    log(f"corpus: {len(data)} documents, {sum(lengths)} tokens, max length {max(lengths)}")
    model = build_lm(tokenizer, lm_cfg, seed).to(device)
    log(f"LM: {sum(p.numel() for p in model.parameters()):,} parameters")
    ocfg = OptimConfig.from_mapping(train_cfg, "lm.train")
    it = batches(data, ocfg.batch_size, tokenizer.pad_token_id, seed, ocfg.length_pool)
    history = train(model, list(model.parameters()), it, ocfg, device, "lm", log)
    return model, tokenizer, history


def train_vlm_stage(
    vlm: torch.nn.Module,
    processor: LlavaProcessor,
    train_ds: Dataset,
    stage: int,
    optim_cfg: Mapping[str, Any],
    seed: int,
    device: torch.device,
    log: Log = print,
    scene_cfg: Mapping[str, Any] | None = None,
) -> list[dict[str, float]]:
    """One LLaVA training stage on the stage's `data`: `captions` (one description per
    training image), `questions` (the VQA conversations) or `both` (each conversation opens
    with the image's description)."""
    where = f"vlm.stage{stage}"
    stage_cfg = config.section(where, optim_cfg)
    data_kind = stage_cfg["data"]
    plan = phases(stage_cfg.get("curriculum", []), stage_cfg["steps"], where)
    if plan and (data_kind != "questions" or not {"relation", "family"} <= set(train_ds.column_names)):
        raise ValueError(f"{where}.curriculum needs {where}.data: questions and a training split "
                         "with relation and family columns (the shapes world's)")
    if data_kind != "questions":
        if scene_cfg is None:
            raise ValueError(f"stage {stage}: captions need the world's scene config")
        train_ds = with_captions(train_ds, scene_cfg, keep_questions=data_kind == "both")
        log(f"stage {stage}: {data_kind}, {len(train_ds)} rows, e.g. caption {train_ds[0]['multiple_choice_answer']!r}")
    data = encode_vqa(processor, train_ds, log=log)
    params = set_stage_trainable(vlm, stage, stage == 2 or stage_cfg["train_vision"])
    log(f"stage {stage}: {sum(p.numel() for p in params):,} trainable parameters")
    ocfg = OptimConfig.from_mapping(stage_cfg, where)

    def make_batches(d: Encoded) -> Iterator[dict[str, torch.Tensor]]:
        return batches(d, ocfg.batch_size, processor.tokenizer.pad_token_id, seed, ocfg.length_pool)

    relations, families = (train_ds["relation"], train_ds["family"]) if plan else ([], [])
    it = curriculum_batches(data, relations, families, plan, make_batches, log)
    vlm.to(device)
    history = train(vlm, params, it, ocfg, device, f"vlm stage {stage}", log)
    for p in vlm.parameters():
        p.requires_grad_(True)
    return history


def train_lm_job(
    *,
    corpus_path: str | Path,
    train_path: str | Path,
    vsr_path: str | Path,
    prompts_path: str | Path,
    lm: Mapping[str, Any],
    scene: Mapping[str, Any],
    seed: int,
    device: str,
    out: Mapping[str, str | Path],
    log: Log = print,
) -> list[dict[str, float]]:
    """The `train_lm` rule: `pretrain_lm` on the world's splits and neutral prompts (a JSON
    list); the LM and its tokenizer to `out["model"]`, the loss history to `out["history"]`."""
    with open(prompts_path) as fh:
        prompts = json.load(fh)
    model, tokenizer, history = pretrain_lm(
        load_split(corpus_path), load_split(train_path), load_split(vsr_path), prompts,
        scene, lm, seed, resolve_device(device), log,
    )
    save_atomic([model, tokenizer], out["model"])
    pd.DataFrame(history).to_csv(out["history"], index=False)
    return history


def train_vlm_stage1_job(
    *,
    lm_dir: str | Path,
    vision_dir: str | Path,
    train_path: str | Path,
    vision: Mapping[str, Any],
    position_code: str,
    position_scale: float,
    image_size: int,
    optim: Mapping[str, Any],
    scene: Mapping[str, Any],
    seed: int,
    device: str,
    out: Mapping[str, str | Path],
    log: Log = print,
) -> list[dict[str, float]]:
    """The `train_vlm_stage1` rule: the VLM built around the pretrained LM and vision tower
    (with the `vlm.image_position_code`, which stage 2 inherits from the saved folder), LLaVA
    stage 1 (`optim`, the `vlm.stage1` section) on the train split; the VLM and its processor
    to `out["model"]`, the loss history to `out["history"]`."""
    lm_model, tokenizer = load_lm(lm_dir)
    tower = load_vision_tower(vision_dir)
    vlm = build_vlm(lm_model, tokenizer, vision, image_size, seed, vision_tower=tower,
                    position_code=position_code, position_scale=position_scale)
    processor = make_processor(tokenizer, image_size, vision["patch_size"])
    return _train_stage_and_save(vlm, processor, 1, train_path, optim, scene, seed, device, out, log)


def train_vlm_stage2_job(
    *,
    previous_dir: str | Path,
    train_path: str | Path,
    optim: Mapping[str, Any],
    scene: Mapping[str, Any],
    seed: int,
    device: str,
    out: Mapping[str, str | Path],
    log: Log = print,
) -> list[dict[str, float]]:
    """The `train_vlm_stage2` rule: the stage-1 VLM in `previous_dir`, LLaVA stage 2 (`optim`,
    the `vlm.stage2` section); outputs as `train_vlm_stage1_job`'s."""
    vlm, processor = load_vlm(previous_dir)
    return _train_stage_and_save(vlm, processor, 2, train_path, optim, scene, seed, device, out, log)


def _train_stage_and_save(
    vlm: torch.nn.Module,
    processor: LlavaProcessor,
    stage: int,
    train_path: str | Path,
    optim: Mapping[str, Any],
    scene: Mapping[str, Any],
    seed: int,
    device: str,
    out: Mapping[str, str | Path],
    log: Log,
) -> list[dict[str, float]]:
    """One LLaVA stage of `vlm` (`train_vlm_stage`), then the model, processor and history."""
    history = train_vlm_stage(vlm, processor, load_split(train_path), stage, optim, seed,
                              resolve_device(device), log, scene_cfg=scene)
    save_atomic([vlm.cpu(), processor], out["model"])
    pd.DataFrame(history).to_csv(out["history"], index=False)
    return history
