"""Patch-vector probe: does an LM learn "is the X left of the Y?" from a vision tower's patch
vectors, and what does a fixed code of each patch's place change?

The tower's last-layer patch vectors (CLS dropped) go through a trainable linear projection to
the LM's width and straight into the LM as its image tokens, followed by one question; the loss
falls on the answer. An arm may add the project's `image_position_table` (`sincos_2d` of the
patch's column and row, centred, unit mean norm) times `scale` times the projected content's
mean token norm, the same code `vlm.image_position_code: sincos2d` adds in the VLM, and may mix
in "what column is the X in?" questions (`column` of them per relation question). Ties (centres
within the world's `tol` on the x axis) are never asked. Held-out accuracy is on balanced
left-of questions about scenes drawn apart from the training scenes.

    python research/patch_probe.py --tower results/default/models/vision
    python research/patch_probe.py --tower results/default/models/vision --lm results/default/models/lm
    python research/patch_probe.py --tower ... --arms none code1 --steps 500 --eval-every 250
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from vlmdiff.config import merged_config
from vlmdiff.files import write_table
from vlmdiff.inputs import user_prompt
from vlmdiff.logs import Log
from vlmdiff.models.build import (
    build_lm,
    image_position_table,
    load_lm,
    load_vision_tower,
    make_image_processor,
)
from vlmdiff.models.tokenizer import IMAGE_TOKEN, build_tokenizer
from vlmdiff.world.drawing import draw
from vlmdiff.world.relations import relation_holds
from vlmdiff.world.scenes import Scene, WorldConfig, grid_cell, sample_scene

# arm -> (code scale, column questions per left-of question)
ARMS: dict[str, tuple[float, float]] = {
    "none": (0.0, 0.0), "code1": (1.0, 0.0), "code2": (2.0, 0.0), "code1+column": (1.0, 1.0)}
QA = tuple[str, str]


def left_of_questions(scene: Scene, cfg: WorldConfig) -> list[QA]:
    """Every "is the A left of the B?" whose answer is decided (no tie on the x axis)."""
    out = []
    for a in scene.objects:
        for b in scene.objects:
            if a is b or abs(a.x - b.x) <= cfg.tol:
                continue
            answer = "yes" if relation_holds("left of", a, b, cfg) else "no"
            out.append((f"is the {a.name} left of the {b.name} ?", answer))
    return out


def column_questions(scene: Scene, cfg: WorldConfig) -> list[QA]:
    return [(f"what column is the {o.name} in ?", str(grid_cell(o.x, scene.image_size, cfg.text_grid)))
            for o in scene.objects]


def balanced(qas: Sequence[QA], rng: np.random.Generator) -> QA | None:
    """One question, its answer drawn uniformly among the answers `qas` has."""
    if not qas:
        return None
    answers = sorted({a for _, a in qas})
    pick = answers[int(rng.integers(len(answers)))]
    pool = [qa for qa in qas if qa[1] == pick]
    return pool[int(rng.integers(len(pool)))]


def even_answers(qas: Sequence[QA]) -> list[QA]:
    """As many yes as no questions from one scene's `qas` (none unless both occur): chance 0.5."""
    by_answer: dict[str, list[QA]] = {}
    for q, a in qas:
        by_answer.setdefault(a, []).append((q, a))
    n = min(len(v) for v in by_answer.values()) if len(by_answer) == 2 else 0
    return [qa for v in by_answer.values() for qa in v[:n]]


@torch.no_grad()
def tower_features(tower: torch.nn.Module, images: Sequence[Any], image_size: int,
                   batch: int = 256) -> torch.Tensor:
    """Last-layer patch vectors without CLS, `[images, patches, dim]`."""
    proc = make_image_processor(image_size)
    out = []
    for lo in range(0, len(images), batch):
        pixels = proc(images=list(images[lo:lo + batch]), return_tensors="pt")["pixel_values"]
        out.append(tower(pixel_values=pixels).last_hidden_state[:, 1:])
    return torch.cat(out)


class PatchLM(torch.nn.Module):
    """Projection of patch vectors to the LM's width (+ the position code) as image tokens."""

    def __init__(self, lm: torch.nn.Module, d_vision: int, n_patches: int, scale: float,
                 projector: str = "linear") -> None:
        super().__init__()
        self.lm, self.scale = lm, scale
        d = lm.config.hidden_size
        # "mlp" is the VLM's own LLaVA projector: linear, GELU, linear
        self.proj = (torch.nn.Linear(d_vision, d) if projector == "linear" else
                     torch.nn.Sequential(torch.nn.Linear(d_vision, d), torch.nn.GELU(),
                                         torch.nn.Linear(d, d)))
        grid = int(round(n_patches**0.5))
        self.register_buffer("code", image_position_table(grid, d), persistent=False)

    def forward(self, feats: torch.Tensor, before: torch.Tensor, after: torch.Tensor,
                mask: torch.Tensor) -> torch.Tensor:
        """Answer logits: `before` the image (e.g. BOS, user tag), the image, `after` it
        (question, assistant tag; right padded, `mask` its real tokens)."""
        image = self.proj(feats)
        if self.scale:
            image = image + self.scale * image.detach().norm(dim=-1).mean() * self.code
        emb = self.lm.get_input_embeddings()
        x = torch.cat([emb(before), image, emb(after)], dim=1)
        full = torch.cat([torch.ones(before.shape[0], before.shape[1] + image.shape[1],
                                     dtype=mask.dtype), mask], dim=1)
        logits = self.lm(inputs_embeds=x, attention_mask=full).logits
        last = full.sum(1) - 1
        return logits[torch.arange(len(last)), last]


def encode(tokenizer: Any, questions: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Token ids before and after the image placeholder of each chat prompt (right padded)."""
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    befores, afters = [], []
    for q in questions:
        text = tokenizer.apply_chat_template(user_prompt(q, with_image=True), tokenize=False,
                                             add_generation_prompt=True)
        ids = tokenizer(text, add_special_tokens=False).input_ids
        i = ids.index(image_id)
        befores.append(ids[:i])
        afters.append(ids[i + 1:])
    if len({len(b) for b in befores}) != 1:
        raise ValueError("the chat template puts different tokens before the image")
    width = max(len(a) for a in afters)
    after = torch.full((len(afters), width), tokenizer.pad_token_id)
    mask = torch.zeros((len(afters), width), dtype=torch.long)
    for r, a in enumerate(afters):
        after[r, :len(a)], mask[r, :len(a)] = torch.tensor(a), 1
    return torch.tensor(befores), after, mask


def run_arm(
    arm: str,
    feats: Mapping[str, torch.Tensor],
    qas: Mapping[str, Sequence[Mapping[str, list[QA]]]],
    heldout: Mapping[str, list[tuple[int, str, str]]],
    *,
    lm_cfg: Mapping[str, Any],
    lm_dir: str | None,
    layers: int,
    steps: int,
    eval_every: int,
    batch_size: int,
    lr: float,
    seed: int,
    log: Log,
    projector: str = "linear",
) -> list[dict[str, Any]]:
    """Train one arm; held-out accuracy rows (arm, step, loss, question kind, accuracy, n)."""
    scale, column = ARMS[arm]
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    texts = [q + " " + a for split in qas.values() for s in split for kind in s.values()
             for q, a in kind]
    if lm_dir:
        lm, tokenizer = load_lm(Path(lm_dir))
        lm.train()
    else:
        tokenizer = build_tokenizer(texts)
        lm = build_lm(tokenizer, {**lm_cfg, "num_layers": layers}, seed)
    train_feats = feats["train"]
    model = PatchLM(lm, train_feats.shape[-1], train_feats.shape[1], scale, projector)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    vocab = tokenizer.get_vocab()
    unknown = sorted({w for t in texts for w in t.split() if w.lower() not in vocab})
    if unknown:
        log(f"{arm}: words outside the LM's vocabulary: {unknown[:10]}")
    rows: list[dict[str, Any]] = []
    loss_sum, n_loss = 0.0, 0
    for step in range(1, steps + 1):
        picks, qs, answers = [], [], []
        while len(qs) < batch_size:
            i = int(rng.integers(len(train_feats)))
            kind = "column" if column and rng.random() < column / (1 + column) else "left of"
            qa = balanced(qas["train"][i][kind], rng)
            if qa is not None:
                picks.append(i), qs.append(qa[0]), answers.append(qa[1])
        before, after, mask = encode(tokenizer, qs)
        target = torch.tensor(tokenizer.convert_tokens_to_ids(answers))
        logits = model(train_feats[picks], before, after, mask)
        loss = torch.nn.functional.cross_entropy(logits, target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        loss_sum, n_loss = loss_sum + float(loss), n_loss + 1
        if step % eval_every == 0 or step == steps:
            model.eval()
            for kind, items in heldout.items():
                if kind == "column" and not column:
                    continue
                acc = accuracy(model, tokenizer, feats["val"], items)
                rows.append({"arm": arm, "step": step, "loss": loss_sum / n_loss, "kind": kind,
                             "accuracy": acc, "n": len(items)})
                log(f"{arm} step {step}: loss {loss_sum / n_loss:.3f}, held-out {kind} {acc:.3f}")
            loss_sum, n_loss = 0.0, 0
            model.train()
    return rows


@torch.no_grad()
def accuracy(model: PatchLM, tokenizer: Any, feats: torch.Tensor,
             items: Sequence[tuple[int, str, str]], batch: int = 256) -> float:
    """Share of held-out (image, question, answer) items whose most likely next token is the
    answer."""
    right = 0
    for lo in range(0, len(items), batch):
        part = items[lo:lo + batch]
        before, after, mask = encode(tokenizer, [q for _, q, _ in part])
        pred = model(feats[[i for i, _, _ in part]], before, after, mask).argmax(-1)
        truth = torch.tensor(tokenizer.convert_tokens_to_ids([a for _, _, a in part]))
        right += int((pred == truth).sum())
    return right / max(1, len(items))


def probe_data(scene_cfg: Mapping[str, Any], tower_dir: str, n_train: int, n_val: int,
               seed: int, log: Log) -> tuple[dict, dict, dict]:
    """Tower features, questions per scene and the held-out items, for every arm alike."""
    cfg = WorldConfig.from_mapping({**scene_cfg, "min_objects": max(2, scene_cfg["min_objects"])})
    rng = np.random.default_rng(seed)
    scenes = {"train": [sample_scene(rng, cfg) for _ in range(n_train)],
              "val": [sample_scene(rng, cfg) for _ in range(n_val)]}
    tower = load_vision_tower(Path(tower_dir))
    feats = {k: tower_features(tower, [draw(s) for s in v], cfg.image_size) for k, v in scenes.items()}
    qas = {k: [{"left of": left_of_questions(s, cfg), "column": column_questions(s, cfg)}
               for s in v] for k, v in scenes.items()}
    heldout: dict[str, list[tuple[int, str, str]]] = {"left of": [], "column": []}
    for i, s in enumerate(qas["val"]):
        heldout["left of"] += [(i, q, a) for q, a in even_answers(s["left of"])]
        heldout["column"] += [(i, q, a) for q, a in s["column"]]
    log(f"{n_train} training and {n_val} held-out scenes; tower features {tuple(feats['train'].shape)}; "
        f"held out: {len(heldout['left of'])} balanced left-of, {len(heldout['column'])} column questions")
    return feats, qas, heldout


def main(argv: Sequence[str] | None = None) -> pd.DataFrame:
    ap = argparse.ArgumentParser(prog="python research/patch_probe.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tower", required=True, help="a vision tower folder (models/vision)")
    ap.add_argument("--lm", help="a pretrained LM folder (models/lm); default: a fresh LM")
    ap.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    ap.add_argument("--configfile", help="preset merged over config.yaml (its world.scene and lm)")
    ap.add_argument("--layers", type=int, default=2, help="layers of a fresh LM")
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--eval-every", type=int, default=250)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--train-scenes", type=int, default=20000)
    ap.add_argument("--val-scenes", type=int, default=400)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--projector", choices=["linear", "mlp"], default="linear",
                    help="the patch projection: linear, or the VLM's two-layer GELU MLP")
    ap.add_argument("--out", default="benchmarks/out/patch_probe.csv")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = merged_config([args.configfile] if args.configfile else [])
    feats, qas, heldout = probe_data(cfg["world"]["scene"], args.tower, args.train_scenes,
                                     args.val_scenes, args.seed, print)
    rows = []
    for arm in args.arms:
        rows += run_arm(arm, feats, qas, heldout, lm_cfg=cfg["lm"], lm_dir=args.lm,
                        layers=args.layers, steps=args.steps, eval_every=args.eval_every,
                        batch_size=args.batch_size, lr=args.lr, seed=args.seed, log=print,
                        projector=args.projector)
    table = pd.DataFrame(rows)
    write_table(table, args.out)
    print(table.pivot_table(index=["arm", "kind"], columns="step", values="accuracy").round(2))
    return table


if __name__ == "__main__":
    main()
