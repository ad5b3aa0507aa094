"""Held-out accuracy of the LM and the VLM stages, per question family."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence

import pandas as pd
import torch
from datasets import Dataset
from transformers import PreTrainedTokenizerFast

from vlmdiff.training import prompt_texts


@torch.no_grad()
def predict_next_token(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerFast,
    questions: Sequence[str],
    images: Sequence | None,
    device: torch.device,
    batch_size: int = 128,
    processor=None,
    contexts: Sequence[str] | None = None,
) -> list[str]:
    """Greedy first answer token for each question (answers are single words = single tokens).

    With `images` the prompt holds `<image>` and goes through the processor; without, the
    question alone goes to the language model.
    """
    tokenizer.padding_side = "right"
    preds: list[str] = []
    for start in range(0, len(questions), batch_size):
        qs = list(questions[start : start + batch_size])
        ctx = None if contexts is None else list(contexts[start : start + batch_size])
        texts = prompt_texts(tokenizer, qs, with_image=images is not None, contexts=ctx)
        if images is not None:
            batch = processor(
                text=texts, images=list(images[start : start + batch_size]),
                return_tensors="pt", padding=True,
            )
        else:
            batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        batch = {k: v.to(device) for k, v in batch.items()}
        logits = model(**batch).logits
        last = batch["attention_mask"].sum(dim=1) - 1
        ids = logits[torch.arange(len(qs), device=device), last].argmax(dim=-1)
        preds += tokenizer.convert_ids_to_tokens(ids.tolist())
    return preds


def accuracy_table(ds: Dataset, predictions: Mapping[str, Sequence[str]]) -> pd.DataFrame:
    """One row per (model, family, answer type): n, accuracy, and the majority-answer baseline."""
    frame = pd.DataFrame(
        {
            "family": ds["family"],
            "answer_type": ds["answer_type"],
            "answer": [a.lower() for a in ds["multiple_choice_answer"]],
        }
    )
    majority = frame.groupby(["family", "answer_type"])["answer"].agg(
        lambda s: s.value_counts(normalize=True).iloc[0]
    )
    rows = []
    for model_name, preds in predictions.items():
        f = frame.assign(correct=[p == a for p, a in zip(preds, frame["answer"], strict=True)])
        grouped = f.groupby(["family", "answer_type"])["correct"].agg(["size", "mean"])
        for (family, answer_type), r in grouped.iterrows():
            rows.append(
                {
                    "model": model_name,
                    "family": family,
                    "answer_type": answer_type,
                    "n": int(r["size"]),
                    "accuracy": float(r["mean"]),
                    "majority_baseline": float(majority[(family, answer_type)]),
                }
            )
        rows.append(
            {
                "model": model_name,
                "family": "all",
                "answer_type": "all",
                "n": len(f),
                "accuracy": float(f["correct"].mean()),
                "majority_baseline": float("nan"),
            }
        )
    return pd.DataFrame(rows)


def evaluate_models(
    val: Dataset,
    lm,
    lm_tokenizer,
    vlms: Mapping[str, tuple],
    device: torch.device,
    batch_size: int,
    scene_cfg: Mapping | None = None,
) -> pd.DataFrame:
    """Accuracy table for the LM alone (question only), the LM reading the scene's description
    instead of the image (what it learnt from text), and each (model, processor) VLM."""
    from vlmdiff.world import Scene, WorldConfig, describe

    questions = val["question"]
    preds = {"lm (no image)": predict_next_token(lm, lm_tokenizer, questions, None, device, batch_size)}
    if scene_cfg is not None and "scene" in val.column_names:
        world = WorldConfig.from_mapping(scene_cfg)
        descriptions = [describe(Scene.from_dict(json.loads(s)), world) for s in val["scene"]]
        preds["lm (text description)"] = predict_next_token(
            lm, lm_tokenizer, questions, None, device, batch_size, contexts=descriptions
        )
    images = val["image"]
    for name, (model, processor) in vlms.items():
        preds[name] = predict_next_token(
            model, processor.tokenizer, questions, images, device, batch_size, processor
        )
    return accuracy_table(val, preds)
