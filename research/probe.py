"""Relation probe on text: where the toy LM's spatial yes/no fails, binding or comparison.

Each probe scene is described as in LM pretraining ("a red circle at column 2 row 5 . ...") and
followed by one spatial yes/no question. Two orders of the description:

- `shuffled`, the corpus's own: answering needs two bindings (each object the question names to
  its entry in the description) and a comparison of the two entries' cells;
- `question`: the objects the question names come first, in the order it names them, then the
  rest, so the comparison can be made by place in the description, with no name bound.

A fresh LM of the `lm` config's shape is trained with the LM recipe (`training.pretrain_lm`'s
tokenizer, loss and optimiser) on one order and scored on held-out scenes of the same order at
every log step. The gap between the two orders is the cost of binding.

    python research/probe.py                    # both orders, the default LM's shape
    python research/probe.py --order question --steps 500 --layers 2
    python research/probe.py --parts 20000     # why binding has no first step (no training)

`--parts` trains nothing: on two-object scenes it splits each left/right/above/below question
into three binary parts whose parity is the answer (is the subject described first, has the
first-described object the lower cell on the relation's axis, does the relation ask for the
lower cell) and reports how often each part, and each parity of parts, agrees with the answer.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
from itertools import combinations
from typing import Any

import numpy as np
import pandas as pd
import torch
from datasets import Dataset
from vlmdiff.config import merged_config, section
from vlmdiff.files import write_table
from vlmdiff.inputs import encode_corpus
from vlmdiff.logs import Log
from vlmdiff.models.build import build_lm, resolve_device
from vlmdiff.models.evaluation import predict_next_token
from vlmdiff.models.tokenizer import build_tokenizer
from vlmdiff.models.training import OptimConfig, batches, train
from vlmdiff.world.questions import QA, make_question
from vlmdiff.world.scenes import (
    FAMILIES,
    RELATIONS,
    Scene,
    WorldConfig,
    describe,
    grid_cell,
    sample_scene,
)

ORDERS: tuple[str, ...] = ("shuffled", "question")
# relation -> (axis, whether it asks for the lower grid cell: left of / above)
AXIS_RELATIONS: dict[str, tuple[str, bool]] = {
    "left of": ("x", True), "right of": ("x", False), "above": ("y", True), "below": ("y", False),
}
PARTS: tuple[str, ...] = ("subject_first", "first_lower", "asks_lower")
_TRIES = 200


def probe_world(scene_cfg: Mapping[str, Any], relations: Sequence[str]) -> WorldConfig:
    """The scene config with spatial questions only, and enough objects for every relation."""
    unknown = sorted(set(relations) - set(RELATIONS))
    if not relations or unknown:
        raise ValueError(
            f"probe relations must be a non-empty subset of {list(RELATIONS)}, "
            f"got {list(relations)}"
        )
    weights = {f: float(f == "spatial") for f in FAMILIES}
    min_objects = 3 if set(relations) == {"between"} else 2
    cfg = dict(section("world.scene", scene_cfg), family_weights=weights)
    cfg["min_objects"] = max(min_objects, cfg["min_objects"])
    cfg["max_objects"] = max(cfg["min_objects"], cfg["max_objects"])
    return WorldConfig.from_mapping(cfg)


def relation_question(
    scene: Scene, rng: np.random.Generator, cfg: WorldConfig, relations: Sequence[str]
) -> QA | None:
    """A yes/no question about one of `relations` (answers balanced per relation, as in the
    world); None when the scene has none."""
    for _ in range(_TRIES):
        qa = make_question(scene, rng, cfg)
        if qa.answer_type == "yes/no" and qa.relation in relations:
            return qa
    return None


def ordered_description(
    scene: Scene, qa: QA, cfg: WorldConfig, rng: np.random.Generator, order: str
) -> str:
    """`describe(scene)` with the objects shuffled, or with the question's objects first."""
    if order == "shuffled":
        return describe(scene, cfg, rng)
    if order != "question":
        raise ValueError(f"probe order must be one of {list(ORDERS)}, got {order!r}")
    named = [n for n in (qa.subj, qa.obj, qa.obj2) if n is not None]
    by_name = {o.name: o for o in scene.objects}
    rest = [o for o in scene.objects if o.name not in named]
    rest = [rest[int(i)] for i in rng.permutation(len(rest))]
    return describe(Scene(tuple(by_name[n] for n in named) + tuple(rest), scene.image_size), cfg)


def relation_corpus(
    cfg: WorldConfig,
    rng: np.random.Generator,
    n: int,
    order: str,
    relations: Sequence[str],
    exclude: Dataset | None = None,
) -> Dataset:
    """`n` scenes, each a description and one relation question, in the corpus layout; none
    with the same description and question as a row of `exclude` (held-out sets)."""
    seen = set()
    if exclude is not None:
        seen = {(d, q[0]) for d, q in zip(exclude["description"], exclude["questions"], strict=True)}
    keys = ("description", "questions", "answers", "families", "relation")
    cols: dict[str, list] = {k: [] for k in keys}
    while len(cols["description"]) < n:
        scene = sample_scene(rng, cfg)
        qa = relation_question(scene, rng, cfg, relations)
        if qa is None:
            continue
        description = ordered_description(scene, qa, cfg, rng, order)
        if (description, qa.question) in seen:
            continue
        cols["description"].append(description)
        cols["questions"].append([qa.question])
        cols["answers"].append([qa.answer])
        cols["families"].append([qa.family])
        cols["relation"].append(qa.relation)
    return Dataset.from_dict(cols)


def relation_accuracy(
    relations: Sequence[str], answers: Sequence[str], preds: Sequence[str]
) -> dict[str, float]:
    """Accuracy per relation and over all ("all"), as `acc/<relation>` keys."""
    ok = [p == a for p, a in zip(preds, answers, strict=True)]
    df = pd.DataFrame({"relation": list(relations), "ok": ok})
    out = {f"acc/{rel}": float(g.ok.mean()) for rel, g in df.groupby("relation")}
    out["acc/all"] = float(df.ok.mean())
    return out


def run_probe(
    scene_cfg: Mapping[str, Any],
    lm_cfg: Mapping[str, Any],
    order: str,
    relations: Sequence[str] = RELATIONS,
    n_train: int = 20000,
    n_eval: int = 1000,
    seed: int = 0,
    device: torch.device | str = "cpu",
    log: Log = print,
) -> pd.DataFrame:
    """Train a fresh LM on one order; held-out accuracy per relation at every log step, as rows
    (order, step, loss, relation, accuracy, n)."""
    cfg = probe_world(scene_cfg, relations)
    rng = np.random.default_rng(seed)
    train_ds = relation_corpus(cfg, rng, n_train, order, relations)
    eval_ds = relation_corpus(cfg, rng, n_eval, order, relations, exclude=train_ds)
    descriptions = list(eval_ds["description"])
    questions = [qs[0] for qs in eval_ds["questions"]]
    answers = [a[0] for a in eval_ds["answers"]]
    texts = [*train_ds["description"], *descriptions, *questions, "yes no"]
    texts += [qs[0] for qs in train_ds["questions"]]
    tokenizer = build_tokenizer(texts)
    dev = torch.device(device) if isinstance(device, str) else device
    model = build_lm(tokenizer, lm_cfg, seed).to(dev)
    ocfg = OptimConfig.from_mapping(lm_cfg["train"], "lm.train")
    data = encode_corpus(tokenizer, train_ds, lm_cfg["max_len"], "answers")

    def evaluate(step: int) -> dict[str, float]:
        preds = predict_next_token(
            model, tokenizer, questions, None, dev, contexts=descriptions
        )
        acc = relation_accuracy(list(eval_ds["relation"]), answers, preds)
        log(f"probe ({order}) step {step}: spatial yes/no {acc['acc/all']:.3f}")
        return acc

    first = train_ds[0]
    log(
        f"probe ({order}): {len(train_ds)} training and {len(eval_ds)} held-out scenes, e.g. "
        f"{first['description']!r} / {first['questions'][0]!r} -> {first['answers'][0]!r}"
    )
    it = batches(data, ocfg.batch_size, tokenizer.pad_token_id, seed)
    tag = f"probe ({order})"
    history = train(model, list(model.parameters()), it, ocfg, dev, tag, log, evaluate)
    counts = pd.Series(list(eval_ds["relation"])).value_counts().to_dict()
    counts["all"] = len(eval_ds)
    rows = [
        {"order": order, "step": h["step"], "loss": h["loss"], "relation": k[4:], "accuracy": v,
         "n": counts[k[4:]]}
        for h in history
        for k, v in h.items()
        if k.startswith("acc/")
    ]
    return pd.DataFrame(rows)


def answer_parts(
    scene_cfg: Mapping[str, Any],
    n: int,
    relations: Sequence[str] = ("left of", "right of"),
    order: str = "shuffled",
    seed: int = 0,
) -> pd.DataFrame:
    """Questions about two-object scenes split into `PARTS` (booleans), with `tie` (both
    objects in one grid cell on the axis, where the answer follows exact coordinates) and `yes`.
    Off ties the answer is the parity of the three parts."""
    unknown = sorted(set(relations) - set(AXIS_RELATIONS))
    if not relations or unknown:
        raise ValueError(f"answer parts need relations from {list(AXIS_RELATIONS)}, got {unknown}")
    cfg = probe_world(dict(scene_cfg, min_objects=2, max_objects=2), relations)
    rng = np.random.default_rng(seed)
    rows = []
    while len(rows) < n:
        scene = sample_scene(rng, cfg)
        qa = relation_question(scene, rng, cfg, relations)
        if qa is None:
            continue
        words = ordered_description(scene, qa, cfg, rng, order).split()
        first = next(o for o in scene.objects if (o.colour, o.shape) == (words[1], words[2]))
        second = next(o for o in scene.objects if o is not first)
        axis, asks_lower = AXIS_RELATIONS[qa.relation]
        c1, c2 = (grid_cell(getattr(o, axis), scene.image_size, cfg.text_grid)
                  for o in (first, second))
        rows.append({"relation": qa.relation, "subject_first": qa.subj == first.name,
                     "first_lower": c1 < c2, "asks_lower": asks_lower, "tie": c1 == c2,
                     "yes": qa.answer == "yes"})
    return pd.DataFrame(rows)


def parts_agreement(parts: pd.DataFrame) -> pd.DataFrame:
    """For each non-empty set of `PARTS`: how often their parity, or its negation, agrees with
    the answer off ties (0.5: the set alone says nothing about the answer)."""
    df = parts[~parts.tie]
    rows = []
    for k in range(1, len(PARTS) + 1):
        for combo in combinations(PARTS, k):
            parity = np.logical_xor.reduce(df[list(combo)].to_numpy(bool), axis=1)
            agree = float((parity == df.yes.to_numpy(bool)).mean())
            rows.append({"parts": " ^ ".join(combo), "agreement": max(agree, 1 - agree),
                         "n": len(df)})
    return pd.DataFrame(rows)


def main(argv: Sequence[str] | None = None) -> pd.DataFrame:
    ap = argparse.ArgumentParser(prog="python research/probe.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configfile", help="preset merged over config.yaml (its world.scene and lm)")
    ap.add_argument("--order", choices=[*ORDERS, "both"], default="both")
    ap.add_argument("--relations", nargs="+", default=list(RELATIONS), metavar="REL",
                    help='e.g. "left of" "right of" (default: all seven)')
    ap.add_argument("--max-objects", type=int, help="default: world.scene.max_objects")
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, help="default: lm.train.lr")
    ap.add_argument("--layers", type=int, help="default: lm.num_layers")
    ap.add_argument("--log-every", type=int, default=250)
    ap.add_argument("--train-scenes", type=int, default=20000)
    ap.add_argument("--eval-scenes", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--parts", type=int, metavar="N",
                    help="train nothing: the answer-parts table on N two-object questions "
                         "(relations: left of, right of, above, below)")
    ap.add_argument("--out", default="results/probe/relation_probe.csv")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = merged_config([args.configfile] if args.configfile else [])  # what a run gets
    lm = dict(cfg["lm"], num_layers=args.layers or cfg["lm"]["num_layers"])
    lm["train"] = dict(lm["train"], steps=args.steps, batch_size=args.batch_size,
                       log_every=args.log_every, lr=args.lr or lm["train"]["lr"], length_pool=1)
    scene = dict(cfg["world"]["scene"])
    if args.max_objects:
        scene["max_objects"] = args.max_objects
    orders = ORDERS if args.order == "both" else (args.order,)
    if args.parts:
        rels = [r for r in args.relations if r in AXIS_RELATIONS] or list(AXIS_RELATIONS)
        table = pd.concat(
            [parts_agreement(answer_parts(scene, args.parts, rels, o, args.seed)).assign(order=o)
             for o in orders],
            ignore_index=True,
        )
        print(table.to_string(index=False))
    else:
        table = pd.concat(
            [run_probe(scene, lm, order, args.relations, args.train_scenes, args.eval_scenes,
                       args.seed, resolve_device(args.device)) for order in orders],
            ignore_index=True,
        )
        wide = table.pivot_table(index=["order", "step"], columns="relation", values="accuracy")
        print(wide.round(3).to_string())
    print(f"wrote {write_table(table, args.out)}")
    return table


if __name__ == "__main__":
    main()
