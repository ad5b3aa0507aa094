"""Held-out accuracy of the LM and the VLM stages, per question family."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from datasets import Dataset
from transformers import PreTrainedTokenizerFast

from vlmdiff.inputs import prompt_texts
from vlmdiff.logs import Log
from vlmdiff.models.build import projector
from vlmdiff.models.vision import patch_place_r2, unique_images


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


def accuracy_table(
    ds: Dataset,
    predictions: Mapping[str, Sequence[str]],
    by: tuple[str, ...] = ("family", "answer_type"),
) -> pd.DataFrame:
    """One row per (model, *by): n, accuracy, and the majority-answer baseline; plus a row per
    model with every `by` column "all"."""
    frame = pd.DataFrame({c: ds[c] for c in by})
    frame["answer"] = [a.lower() for a in ds["multiple_choice_answer"]]
    keys = list(by)
    majority = frame.groupby(keys)["answer"].agg(lambda s: s.value_counts(normalize=True).iloc[0])
    rows = []
    for model_name, preds in predictions.items():
        f = frame.assign(correct=[p == a for p, a in zip(preds, frame["answer"], strict=True)])
        grouped = f.groupby(keys)["correct"].agg(["size", "mean"])
        for key, r in grouped.iterrows():
            key = key if isinstance(key, tuple) else (key,)
            rows.append(
                {
                    "model": model_name,
                    **dict(zip(keys, key, strict=True)),
                    "n": int(r["size"]),
                    "accuracy": float(r["mean"]),
                    "majority_baseline": float(majority[key if len(key) > 1 else key[0]]),
                }
            )
        rows.append(
            {
                "model": model_name,
                **dict.fromkeys(keys, "all"),
                "n": len(f),
                "accuracy": float(f["correct"].mean()) if len(f) else float("nan"),
                "majority_baseline": float("nan"),
            }
        )
    return pd.DataFrame(rows, columns=["model", *keys, "n", "accuracy", "majority_baseline"])


def relation_table(ds: Dataset, predictions: Mapping[str, Sequence[str]]) -> pd.DataFrame:
    """`accuracy_table` of the spatial questions per relation and answer type (empty when the
    split has no `relation` column, as real VQAv2 has not)."""
    by = ("relation", "answer_type")
    if "relation" not in ds.column_names:
        empty = Dataset.from_dict({c: [] for c in (*by, "multiple_choice_answer")})
        return accuracy_table(empty, {m: [] for m in predictions}, by)
    rows = [i for i, f in enumerate(ds["family"]) if f == "spatial"]
    spatial = {m: [p[i] for i in rows] for m, p in predictions.items()}
    return accuracy_table(ds.select(rows), spatial, by)


ATTRIBUTE_FAMILIES = ("colour", "shape")  # each family asks for the scene attribute of its name
ERROR_KINDS = ("correct", "another object's", "not in the scene")


def attribute_errors(ds: Dataset, predictions: Mapping[str, Sequence[str]]) -> pd.DataFrame:
    """Colour and shape questions split by how each answer relates to the drawn scene.

    An answer is "correct", names the asked attribute of "another object's" in the scene (the
    model saw the attribute but read it off the wrong object: a binding error), or is "not in the
    scene" (a perception error, or no attribute at all). One row per (model, family, number of
    objects), plus an "all" row per model and family; the three shares sum to 1. Empty for
    splits without a `scene` column (real VQAv2).
    """
    columns = ["model", "family", "n_objects", "n", *ERROR_KINDS]
    if "scene" not in ds.column_names:
        return pd.DataFrame(columns=columns)
    rows = []
    for i, (family, scene, answer) in enumerate(
        zip(ds["family"], ds["scene"], ds["multiple_choice_answer"], strict=True)
    ):
        if family not in ATTRIBUTE_FAMILIES:
            continue
        objects = json.loads(scene)["objects"]
        values, n_objects = {o[family] for o in objects}, len(objects)
        for model_name, preds in predictions.items():
            pred = preds[i]
            kind = ERROR_KINDS[0] if pred == answer.lower() else (
                ERROR_KINDS[1] if pred in values else ERROR_KINDS[2])
            rows.append({"model": model_name, "family": family, "n_objects": n_objects, "kind": kind})
    if not rows:
        return pd.DataFrame(columns=columns)
    frame = pd.DataFrame(rows)
    # ordered categories keep models in the given order and object counts numeric, "all" last
    levels = {"model": list(predictions), "family": sorted(set(frame["family"])),
              "n_objects": [*map(str, sorted(set(frame["n_objects"]))), "all"]}
    # fresh labels: crosstab aligns its inputs on the index, which pandas 3.0 cannot do when labels repeat
    frame = pd.concat(
        [frame.astype({"n_objects": str}), frame.assign(n_objects="all")], ignore_index=True
    )
    keys = list(levels)
    for k in keys:
        frame[k] = pd.Categorical(frame[k], categories=levels[k], ordered=True)
    shares = pd.crosstab([frame[k] for k in keys], frame["kind"], normalize="index")
    shares = shares.reindex(columns=list(ERROR_KINDS), fill_value=0.0)
    out = shares.join(frame.groupby(keys, observed=True).size().rename("n")).reset_index()
    out = out.sort_values(keys).astype({k: str for k in keys})
    return out[columns].reset_index(drop=True)


def predict_models(
    val: Dataset,
    lm,
    lm_tokenizer,
    vlms: Mapping[str, tuple],
    device: torch.device,
    batch_size: int,
    scene_cfg: Mapping | None = None,
) -> dict[str, list[str]]:
    """Predicted answers of the LM alone (question only), the LM reading the scene's
    description instead of the image (what it learnt from text), and each (model, processor)
    VLM; `accuracy_table` and `relation_table` score them."""
    from vlmdiff.world.scenes import Scene, WorldConfig, describe

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
    return preds


@torch.no_grad()
def image_token_positions(
    vlms: Mapping[str, tuple], images: Sequence, device: torch.device, batch_size: int = 64
) -> pd.DataFrame:
    """Whether a VLM's image tokens say where they are: for each model, the held-out R^2 of
    linear probes for each patch's column and row, read from the vision tower's feature layer, the
    projector's output (the language model's input) and every language-model layer's output at
    the image positions. Attention moves a token's content but not its place (RoPE acts on
    queries and keys only), so whatever a question learns about where an object is must come
    from these features."""
    rows = []
    # the projector's input is the tower's selected feature layer, its output the LM's input
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    for name, (model, processor) in vlms.items():
        text = prompt_texts(processor.tokenizer, ["?"], with_image=True)[0]
        feats: dict[str, list[torch.Tensor]] = {}
        handle = projector(model).register_forward_hook(lambda _m, a, o: seen.append((a[0], o)))
        try:
            for start in range(0, len(images), batch_size):
                imgs = list(images[start : start + batch_size])
                batch = processor(text=[text] * len(imgs), images=imgs, return_tensors="pt")
                batch = {k: v.to(device) for k, v in batch.items()}
                out = model(**batch, output_hidden_states=True)
                tower, projected = seen.pop()
                mask = batch["input_ids"] == model.config.image_token_id
                steps = {"vision tower": tower, "projector (LM input)": projected}
                for k, h in enumerate(out.hidden_states[1:], start=1):
                    steps[f"LM layer {k}"] = h[mask].reshape(len(imgs), -1, h.shape[-1])
                for where, h in steps.items():
                    feats.setdefault(where, []).append(h.float().cpu())
        finally:
            handle.remove()
        for depth, (where, hs) in enumerate(feats.items()):
            h = torch.cat(hs)
            r2_column, r2_row = patch_place_r2(h)
            rows.append({"model": name, "where": where, "depth": depth - 1,
                         "r2_column": r2_column, "r2_row": r2_row, "n_images": len(h)})
    return pd.DataFrame(rows)


def eval_models_job(
    *,
    lm_dir: str | Path,
    stage1_dir: str | Path,
    stage2_dir: str | Path,
    val_path: str | Path,
    batch_size: int,
    position_images: int,
    scene: Mapping[str, Any],
    device: str,
    out: Mapping[str, str | Path],
    log: Log = print,
) -> dict[str, pd.DataFrame]:
    """The `eval_models` rule: the LM and both VLM stages on the val split. Tables (CSV) and
    figures (PNG, PDF) in `out`: `table`/`plot`/`plot_pdf` (accuracy per question family),
    `relations`/`relations_plot`/`relations_pdf` (spatial questions per relation),
    `errors`/`errors_plot`/`errors_pdf` (colour and shape answers), and
    `positions`/`positions_plot`/`positions_pdf` (image tokens' patch place, on the first
    `position_images` distinct images)."""
    from vlmdiff.models.build import load_lm, load_vlm, resolve_device
    from vlmdiff.plots import accuracy_bars, error_bars, position_lines, save
    from vlmdiff.world.layouts import load_split

    dev = resolve_device(device)
    val = load_split(val_path)
    lm, tokenizer = load_lm(lm_dir, dev)
    vlms = {"vlm stage 1": load_vlm(stage1_dir, dev), "vlm stage 2": load_vlm(stage2_dir, dev)}
    preds = predict_models(val, lm, tokenizer, vlms, dev, batch_size, scene)
    table, relations = accuracy_table(val, preds), relation_table(val, preds)
    table.to_csv(out["table"], index=False)
    relations.to_csv(out["relations"], index=False)
    errors = attribute_errors(val, preds)
    errors.to_csv(out["errors"], index=False)
    log(f"\n{table.to_string(index=False)}\n\nspatial, per relation:\n"
        f"{relations.to_string(index=False)}\n\ncolour and shape answers:\n"
        f"{errors.round(3).to_string(index=False)}")
    save(accuracy_bars(table, "Held-out accuracy per question family"), out["plot"],
         out["plot_pdf"])
    title = "Spatial questions: held-out accuracy per relation"
    save(accuracy_bars(relations, title, ("relation", "answer_type")), out["relations_plot"],
         out["relations_pdf"])
    save(error_bars(errors, "Colour and shape answers: correct, or another object's attribute"),
         out["errors_plot"], out["errors_pdf"])
    images = unique_images(val)
    images = images.select(range(min(position_images, len(images))))["image"]
    positions = image_token_positions(vlms, images, dev)
    positions.to_csv(out["positions"], index=False)
    log("\nimage tokens, R^2 of their patch's column and row:\n"
        f"{positions.round(3).to_string(index=False)}")
    save(position_lines(positions, "Image tokens: how linearly they encode their patch's place"),
         out["positions_plot"], out["positions_pdf"])
    return {"table": table, "relations": relations, "errors": errors, "positions": positions}
