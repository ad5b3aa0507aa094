"""Stage-2 probe: which part of the VLM's stage-2 diet holds relations back?

A saved VLM (e.g. `models/vlm_stage1`) is trained by the workflow's own `train` loop and
conversation encoding (`encode_conversations`: the loss on every answer and its EOS, AdamW with
warm-up and cosine decay, the `vlm.stage2` section's settings), on questions drawn fresh every
step from scenes drawn apart from the held-out ones. The diet is the world's question generator
under a scene config (`--configfile`: its `family_weights` and `relations`), `--turns` questions
per conversation; `--left-of` asks only the patch probe's "is the X left of the Y?" instead;
`--phase CFG:N` (repeatable, in order) draws the questions of every step up to N from another
scene config: a relation curriculum. Held out: balanced left-of questions on fresh scenes and,
with `--val`, every two-object left/right/above/below yes/no question of a world's val split,
per relation.

    python research/stage2_probe.py --vlm results/relonly/models/vlm_stage1 --left-of
    python research/stage2_probe.py --vlm ... --configfile SPATIAL_LRAB.yaml \\
        --phase LEFT_ONLY.yaml:750 --steps 2000 --val results/relonly/world/val.parquet
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from vlmdiff.config import merged_config
from vlmdiff.files import write_table
from vlmdiff.inputs import collate, conversation_messages, encode_conversations, user_prompt
from vlmdiff.models.build import load_vlm
from vlmdiff.models.evaluation import predict_next_token
from vlmdiff.models.training import OptimConfig, set_stage_trainable, train
from vlmdiff.world.drawing import draw
from vlmdiff.world.layouts import load_split
from vlmdiff.world.questions import make_questions
from vlmdiff.world.scenes import Scene, WorldConfig, grid_cell, sample_scene

sys.path.insert(0, str(Path(__file__).resolve().parent))
from patch_probe import balanced, even_answers, left_of_questions  # noqa: E402

RELATIONS_SCORED = ("left of", "right of", "above", "below")
QA = tuple[str, str]


def scene_config(configfile: str | None) -> WorldConfig:
    return WorldConfig.from_mapping(merged_config([configfile] if configfile else [])["world"]["scene"])


def parse_phases(specs: Sequence[str]) -> list[tuple[WorldConfig, int]]:
    """`CFG:N` specs as (scene config, last step), checked to rise."""
    out = []
    for spec in specs:
        path, _, until = spec.rpartition(":")
        if not path or not until.isdigit():
            raise SystemExit(f"--phase {spec!r}: expected CONFIGFILE:STEP")
        out.append((scene_config(path), int(until)))
    if [n for _, n in out] != sorted({n for _, n in out}):
        raise SystemExit("--phase steps must rise from one phase to the next")
    return out


AXIS = {"left of": "column", "right of": "column", "above": "row", "below": "row"}
NAMES = re.compile(r"^is the (\w+ \w+) .* the (\w+ \w+) ?\?$")


def look_ups(scene: Scene, cfg: WorldConfig, relation: str, question: str) -> list[QA]:
    """The grounding turns of a two-object relation question: "what column is the X in?" (rows
    for above/below) for its subject, then its object, with their `text_grid` cells."""
    m = NAMES.match(question)
    if relation not in AXIS or not m:
        return []
    axis, objs = AXIS[relation], {o.name: o for o in scene.objects}
    out = []
    for name in (m[1], m[2]):
        o = objs[name]
        cell = grid_cell(o.x if axis == "column" else o.y, scene.image_size, cfg.text_grid)
        out.append((f"what {axis} is the {name} in?", str(cell)))
    return out


def conversation(scene: Scene, cfg: WorldConfig, rng: np.random.Generator, turns: int,
                 left_of: bool, grounding: bool = False) -> list[QA] | None:
    """`turns` questions about one scene, or None if the scene has none of the kind asked; with
    `grounding`, each two-object relation question comes after its look-ups (`look_ups`)."""
    if left_of:
        pool = left_of_questions(scene, cfg)
        qas = [balanced(pool, rng) for _ in range(turns)]
        picked: list[tuple[QA, str]] = [] if any(qa is None for qa in qas) else [(qa, "left of") for qa in qas]  # type: ignore[misc]
        if not picked:
            return None
    else:
        picked = [((q.question, q.answer), q.relation or "") for q in make_questions(scene, rng, cfg, turns)]
    out: list[QA] = []
    for qa, rel in picked:
        if grounding:
            out += look_ups(scene, cfg, rel, qa[0])
        out.append(qa)
    return out


def batches(
    processor: Any,
    scenes: Sequence[Scene],
    images: Sequence[Any],
    world: WorldConfig,
    phases: Sequence[tuple[WorldConfig, int]],
    *,
    batch_size: int,
    turns: int,
    left_of: bool,
    seed: int,
    mix: tuple[WorldConfig, float] | None = None,
    grounding: bool = False,
) -> Iterator[dict[str, torch.Tensor]]:
    """Endless training batches in stage 2's format, questions drawn afresh every step; with
    `mix` (config, p) outside the phases, each conversation comes from that config's scene
    with probability p."""
    rng = np.random.default_rng(seed)
    step = 0
    while True:
        step += 1
        cfg = next((c for c, until in phases if step <= until), world)
        picks, convs = [], []
        while len(picks) < batch_size:
            i = int(rng.integers(len(scenes)))
            this = mix[0] if mix and cfg is world and rng.random() < mix[1] else cfg
            qas = conversation(scenes[i], this, rng, turns, left_of, grounding)
            if qas:
                picks.append(i)
                convs.append(qas)
        enc = encode_conversations(processor, [images[i] for i in picks],
                                   [[q for q, _ in c] for c in convs], [[a for _, a in c] for c in convs])
        yield collate(enc, range(batch_size), processor.tokenizer.pad_token_id)


def heldout_left_of(scenes: Sequence[Scene], cfg: WorldConfig) -> list[tuple[int, str, str]]:
    """As many yes as no left-of questions per held-out scene (chance 0.5), ties never asked."""
    return [(i, q, a) for i, s in enumerate(scenes) for q, a in even_answers(left_of_questions(s, cfg))]


@torch.no_grad()
def predict_after(vlm: Any, processor: Any, turns: Sequence[Sequence[QA]], questions: Sequence[str],
                  images: Sequence[Any], batch_size: int = 128) -> list[str]:
    """Greedy first answer token of each question asked after its earlier turns (the image in
    the first user message, as in training)."""
    tok = processor.tokenizer
    tok.padding_side = "right"
    preds: list[str] = []
    for start in range(0, len(questions), batch_size):
        texts = []
        for prev, q in zip(turns[start:start + batch_size], questions[start:start + batch_size], strict=True):
            messages = conversation_messages([pq for pq, _ in prev], [pa for _, pa in prev])
            messages += user_prompt(q, with_image=not prev)
            texts.append(tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
        batch = processor(text=texts, images=list(images[start:start + batch_size]), return_tensors="pt",
                          padding=True)
        logits = vlm(**batch).logits
        last = batch["attention_mask"].sum(dim=1) - 1
        preds += tok.convert_ids_to_tokens(logits[torch.arange(len(texts)), last].argmax(-1).tolist())
    return preds


def grounded_scores(vlm: Any, processor: Any, questions: Sequence[str], answers: Sequence[str],
                    ground: Sequence[list[QA]], images: Sequence[Any]) -> dict[str, np.ndarray]:
    """Per question: right or wrong asked plainly, after the true look-ups (oracle), and after
    look-ups the model answers itself (self); and whether its own look-ups were right."""
    n = len(questions)
    plain = predict_after(vlm, processor, [[]] * n, questions, images)
    oracle = predict_after(vlm, processor, ground, questions, images)
    first = predict_after(vlm, processor, [[]] * n, [g[0][0] for g in ground], images)
    second = predict_after(vlm, processor, [[(g[0][0], a)] for g, a in zip(ground, first, strict=True)],
                           [g[1][0] for g in ground], images)
    own = [[(g[0][0], a), (g[1][0], b)] for g, a, b in zip(ground, first, second, strict=True)]
    self_ = predict_after(vlm, processor, own, questions, images)
    truth = np.asarray(answers)
    return {"plain": np.asarray(plain) == truth, "oracle": np.asarray(oracle) == truth,
            "self": np.asarray(self_) == truth,
            "look-ups": np.array([f == g[0][1] and s2 == g[1][1] for f, s2, g in zip(first, second, ground, strict=True)])}


def evaluate(vlm: Any, processor: Any, items: Sequence[tuple[int, str, str]], images: Sequence[Any],
             val: Any | None, grounding: bool = False, held: Sequence[Scene] = (),
             cfg: WorldConfig | None = None) -> dict[str, tuple[float, int]]:
    """Held-out accuracy (and n) of left-of and, from `val`, of each scored relation; with
    `grounding`, also after the true look-ups (oracle), after the model's own (self), and of
    the look-ups themselves."""
    tok, cpu = processor.tokenizer, torch.device("cpu")
    if grounding and cfg is not None:
        out = {}
        ground = [look_ups(held[i], cfg, "left of", q) for i, q, _ in items]
        sc = grounded_scores(vlm, processor, [q for _, q, _ in items], [a for _, _, a in items], ground,
                             [images[i] for i, _, _ in items])
        out.update({f"left of (probe, {k})": (float(v.mean()), len(v)) for k, v in sc.items()})
        if val is not None:
            scenes = [Scene.from_dict(json.loads(x)) for x in val["scene"]]
            ground = [look_ups(sc_, cfg, r, q) for sc_, r, q in zip(scenes, val["relation"], val["question"], strict=True)]
            sc = grounded_scores(vlm, processor, val["question"], val["multiple_choice_answer"], ground, val["image"])
            rel = np.array(val["relation"])
            for k, v in sc.items():
                out[f"left/right/above/below ({k})"] = (float(v.mean()), len(v))
                for r in RELATIONS_SCORED:
                    if (rel == r).any():
                        out[f"{r} ({k})"] = (float(v[rel == r].mean()), int((rel == r).sum()))
        return out
    pred = predict_next_token(vlm, tok, [q for _, q, _ in items], [images[i] for i, _, _ in items],
                              cpu, 256, processor)
    out = {"left of (probe)": (float(np.mean([p == a for p, (_, _, a) in zip(pred, items, strict=True)])),
                               len(items))}
    if val is not None:
        pred = predict_next_token(vlm, tok, val["question"], val["image"], cpu, 256, processor)
        ok = np.array([p == a for p, a in zip(pred, val["multiple_choice_answer"], strict=True)])
        rel = np.array(val["relation"])
        out["left/right/above/below"] = (float(ok.mean()), len(ok))
        for r in RELATIONS_SCORED:
            out[r] = (float(ok[rel == r].mean()), int((rel == r).sum()))
    return out


def scored_val(path: str, relations: Sequence[str] | None = None) -> Any:
    """The two-object left/right/above/below (or `relations`) yes/no rows of a world's val split."""
    ds = load_split(path)
    rels = set(relations or RELATIONS_SCORED)
    keep = [i for i, (f, r, t) in enumerate(zip(ds["family"], ds["relation"], ds["answer_type"], strict=True))
            if f == "spatial" and t == "yes/no" and r in rels]
    return ds.select(keep)


def main(argv: Sequence[str] | None = None) -> pd.DataFrame:
    ap = argparse.ArgumentParser(prog="python research/stage2_probe.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vlm", required=True, help="a saved VLM folder (models/vlm_stage1)")
    ap.add_argument("--configfile", help="preset merged over config.yaml: the diet's world.scene "
                    "and the vlm.stage2 optimiser settings")
    ap.add_argument("--phase", action="append", default=[], metavar="CONFIGFILE:STEP",
                    help="draw the questions of every step up to STEP from this config's scene")
    ap.add_argument("--mix", metavar="CONFIGFILE:P", help="outside the phases, draw each "
                    "conversation from this config's scene with probability P")
    ap.add_argument("--left-of", action="store_true", help="ask only balanced left-of questions")
    ap.add_argument("--turns", type=int, default=1, help="questions per conversation")
    ap.add_argument("--grounding", action="store_true", help="ask the column (left/right) or row "
                    "(above/below) of a relation question's two objects before it, in training and "
                    "in held-out scoring (also scored plainly, after the true look-ups, and after "
                    "the model's own)")
    ap.add_argument("--relations", nargs="+", help="score only these of the val split's relations")
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--eval-every", type=int, default=250)
    ap.add_argument("--train-scenes", type=int, default=20000)
    ap.add_argument("--val-scenes", type=int, default=400)
    ap.add_argument("--val", help="a world's val.parquet: also score its left/right/above/below yes/no")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--name", default="diet", help="the run's name in the table")
    ap.add_argument("--out", default="benchmarks/out/stage2_probe.csv")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = merged_config([args.configfile] if args.configfile else [])
    world = WorldConfig.from_mapping(cfg["world"]["scene"])
    phases = parse_phases(args.phase)
    mix = None
    if args.mix:
        path, _, p = args.mix.rpartition(":")
        mix = (scene_config(path), float(p))
    two = WorldConfig.from_mapping({**cfg["world"]["scene"], "min_objects": max(2, world.min_objects)})
    rng = np.random.default_rng(args.seed)
    scenes = [sample_scene(rng, two) for _ in range(args.train_scenes)]
    held_scenes = [sample_scene(rng, two) for _ in range(args.val_scenes)]
    images, held_images = [draw(s) for s in scenes], [draw(s) for s in held_scenes]
    items = heldout_left_of(held_scenes, two)
    val = scored_val(args.val, args.relations) if args.val else None
    print(f"{len(scenes)} training scenes; held out: {len(items)} balanced left-of questions"
          + (f", {len(val)} left/right/above/below from {args.val}" if val is not None else ""))
    vlm, processor = load_vlm(Path(args.vlm))
    params = set_stage_trainable(vlm, 2)
    ocfg = OptimConfig.from_mapping({**cfg["vlm"]["stage2"], "steps": args.steps, "lr": args.lr,
                                     "batch_size": args.batch_size,
                                     "log_every": math.gcd(50, args.eval_every)}, "vlm.stage2")
    it = batches(processor, scenes, images, world, phases, batch_size=args.batch_size,
                 turns=args.turns, left_of=args.left_of, seed=args.seed + 1, mix=mix,
                 grounding=args.grounding)
    rows: list[dict[str, Any]] = []

    def on_log(step: int) -> dict[str, float]:
        if step % args.eval_every and step != args.steps:
            return {}
        scores = evaluate(vlm, processor, items, held_images, val, args.grounding, held_scenes, two)
        rows.extend({"name": args.name, "step": step, "kind": k, "accuracy": acc, "n": n}
                    for k, (acc, n) in scores.items())
        print(f"step {step}: " + ", ".join(f"{k} {acc:.3f}" for k, (acc, _) in scores.items()), flush=True)
        return {k: acc for k, (acc, _) in scores.items()}

    train(vlm, params, it, ocfg, torch.device("cpu"), args.name, print, on_log)
    table = pd.DataFrame(rows)
    write_table(table, args.out)
    print(table.pivot_table(index="kind", columns="step", values="accuracy").round(2))
    return table


if __name__ == "__main__":
    main()
