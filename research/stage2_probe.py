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
import math
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from vlmdiff.config import merged_config
from vlmdiff.files import write_table
from vlmdiff.inputs import collate, encode_conversations
from vlmdiff.models.build import load_vlm
from vlmdiff.models.evaluation import predict_next_token
from vlmdiff.models.training import OptimConfig, set_stage_trainable, train
from vlmdiff.world.drawing import draw
from vlmdiff.world.layouts import load_split
from vlmdiff.world.questions import make_questions
from vlmdiff.world.scenes import Scene, WorldConfig, sample_scene

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


def conversation(scene: Scene, cfg: WorldConfig, rng: np.random.Generator, turns: int,
                 left_of: bool) -> list[QA] | None:
    """`turns` questions about one scene, or None if the scene has none of the kind asked."""
    if left_of:
        pool = left_of_questions(scene, cfg)
        qas = [balanced(pool, rng) for _ in range(turns)]
        return None if any(qa is None for qa in qas) else qas  # type: ignore[return-value]
    return [(q.question, q.answer) for q in make_questions(scene, rng, cfg, turns)]


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
            qas = conversation(scenes[i], this, rng, turns, left_of)
            if qas:
                picks.append(i)
                convs.append(qas)
        enc = encode_conversations(processor, [images[i] for i in picks],
                                   [[q for q, _ in c] for c in convs], [[a for _, a in c] for c in convs])
        yield collate(enc, range(batch_size), processor.tokenizer.pad_token_id)


def heldout_left_of(scenes: Sequence[Scene], cfg: WorldConfig) -> list[tuple[int, str, str]]:
    """As many yes as no left-of questions per held-out scene (chance 0.5), ties never asked."""
    return [(i, q, a) for i, s in enumerate(scenes) for q, a in even_answers(left_of_questions(s, cfg))]


def evaluate(vlm: Any, processor: Any, items: Sequence[tuple[int, str, str]], images: Sequence[Any],
             val: Any | None) -> dict[str, tuple[float, int]]:
    """Held-out accuracy (and n) of left-of and, from `val`, of each scored relation."""
    tok, cpu = processor.tokenizer, torch.device("cpu")
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


def scored_val(path: str) -> Any:
    """The two-object left/right/above/below yes/no rows of a world's val split."""
    ds = load_split(path)
    keep = [i for i, (f, r, t) in enumerate(zip(ds["family"], ds["relation"], ds["answer_type"], strict=True))
            if f == "spatial" and t == "yes/no" and r in RELATIONS_SCORED]
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
    val = scored_val(args.val) if args.val else None
    print(f"{len(scenes)} training scenes; held out: {len(items)} balanced left-of questions"
          + (f", {len(val)} left/right/above/below from {args.val}" if val is not None else ""))
    vlm, processor = load_vlm(Path(args.vlm))
    params = set_stage_trainable(vlm, 2)
    ocfg = OptimConfig.from_mapping({**cfg["vlm"]["stage2"], "steps": args.steps, "lr": args.lr,
                                     "batch_size": args.batch_size,
                                     "log_every": math.gcd(50, args.eval_every)}, "vlm.stage2")
    it = batches(processor, scenes, images, world, phases, batch_size=args.batch_size,
                 turns=args.turns, left_of=args.left_of, seed=args.seed + 1, mix=mix)
    rows: list[dict[str, Any]] = []

    def on_log(step: int) -> dict[str, float]:
        if step % args.eval_every and step != args.steps:
            return {}
        scores = evaluate(vlm, processor, items, held_images, val)
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
