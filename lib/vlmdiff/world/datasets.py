"""The shapes world written as datasets in the VQAv2 and VSR layouts, plus a text corpus.

Every split is one parquet file written by `datasets.Dataset.to_parquet`, images embedded as PNG
bytes under the `datasets.Image()` feature, so `vlmdiff.world.layouts.load_split` (or
`Dataset.from_parquet`) gives the images back as PIL images.
"""

from __future__ import annotations

import io
import json
import os
import time
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from datasets import Dataset, Features, Image, Value
from datasets.table import InMemoryTable
from datasets.utils.tqdm import (
    are_progress_bars_disabled,
    disable_progress_bars,
    enable_progress_bars,
)
from PIL import Image as PILImage

from vlmdiff import config
from vlmdiff.files import atomic_path
from vlmdiff.logs import Log, Progress
from vlmdiff.world.drawing import draw
from vlmdiff.world.layouts import (
    CORPUS_COLUMNS,
    corpus_features,
    keyword_mask,
    vqa_features,
    vsr_features,
)
from vlmdiff.world.questions import QA, make_questions, relation_cases
from vlmdiff.world.relations import relation_holds
from vlmdiff.world.scenes import (
    BINARY_RELATIONS,
    RELATION_PHRASES,
    RELATIONS,
    Scene,
    WorldConfig,
    describe,
    sample_scene,
)

# Order of the SeedSequence children; append new splits at the end so old ones keep their seeds.
SPLIT_STREAMS: tuple[str, ...] = ("train", "val", "vsr", "corpus")
VAL_ID_OFFSET = 1_000_000
VSR_ID_OFFSET = 2_000_000
QUESTION_ID_STRIDE = 1000  # question_id = image_id * stride + k, as in VQAv2
N_ANNOTATORS = 10


# ---------------------------------------------------------------------------------------------
# Writing


def noise_vqa(questions: Sequence[str], n: int, image_size: int, seed: int) -> Dataset:
    """`n` rows of uniform-noise RGB images cycling through `questions`, all answered "yes":
    inputs of the right shape and layout for tests and benchmarks, not data to learn from."""
    rng = np.random.default_rng(seed)
    images = [
        PILImage.fromarray(rng.integers(0, 256, (image_size, image_size, 3), dtype=np.uint8))
        for _ in range(n)
    ]
    features = Features(
        {"question": Value("string"), "image": Image(), "multiple_choice_answer": Value("string")}
    )
    rows = {
        "question": [questions[i % len(questions)] for i in range(n)],
        "image": images,
        "multiple_choice_answer": ["yes"] * n,
    }
    return Dataset.from_dict(rows, features=features)


def png_bytes(img: PILImage.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=3)
    return buf.getvalue()


def to_dataset(columns: Mapping[str, list[Any]], features: Features) -> Dataset:
    """An in-memory Dataset from column lists (images as {"bytes", "path"} dicts)."""
    table = pa.Table.from_pydict(dict(columns), schema=features.arrow_schema)
    return Dataset(InMemoryTable(table))


def write_parquet(ds: Dataset, path: str | os.PathLike) -> Path:
    """`ds.to_parquet` to a temporary name beside `path`, then rename into place."""
    path = Path(path)
    quiet = not are_progress_bars_disabled()
    if quiet:  # one bar per tiny file only clutters the job log
        disable_progress_bars()
    try:
        with atomic_path(path) as tmp:
            ds.to_parquet(str(tmp))
    finally:
        if quiet:
            enable_progress_bars()
    return path


def write_json(obj: Any, path: str | os.PathLike) -> Path:
    """JSON to a temporary name beside `path`, then rename into place."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")
    return Path(path)


def scene_json(scene: Scene) -> str:
    return json.dumps(scene.to_dict(), separators=(",", ":"))


def vqa_answers(answer: str) -> list[dict[str, Any]]:
    """Ten identical annotator answers, as in VQAv2's `answers` column."""
    return [
        {"answer": answer, "answer_confidence": "yes", "answer_id": i}
        for i in range(1, N_ANNOTATORS + 1)
    ]


def vqa_rows(
    cfg: WorldConfig,
    rng: np.random.Generator,
    n_rows: int,
    questions_per_image: int,
    *,
    id_offset: int = 0,
    exclude: set[str] | frozenset[str] = frozenset(),
    name: str = "vqa",
    log: Log = print,
) -> dict[str, list[Any]]:
    """Columns of `n_rows` VQA rows: `questions_per_image` questions per drawn image (the last
    image may get fewer). Scenes whose JSON is in `exclude` are redrawn."""
    cols: dict[str, list[Any]] = {c: [] for c in vqa_features()}
    n_images = -(-n_rows // questions_per_image)
    progress = Progress(name, n_rows, log)
    for i in range(n_images):
        scene = sample_scene(rng, cfg)
        key = scene_json(scene)
        while key in exclude:
            scene = sample_scene(rng, cfg)
            key = scene_json(scene)
        image = {"bytes": png_bytes(draw(scene, cfg.font)), "path": None}
        image_id = id_offset + i
        k_max = min(questions_per_image, n_rows - i * questions_per_image)
        for k, qa in enumerate(make_questions(scene, rng, cfg, k_max)):
            _append_vqa(cols, qa, image_id * QUESTION_ID_STRIDE + k, image_id, image, key)
        progress.update(len(cols["question_id"]))
    return cols


def _append_vqa(
    cols: dict[str, list[Any]], qa: QA, qid: int, image_id: int, image: dict, scene: str
) -> None:
    cols["question_id"].append(qid)
    cols["image_id"].append(image_id)
    cols["image"].append(image)
    cols["question"].append(qa.question)
    cols["question_type"].append(qa.question_type)
    cols["answer_type"].append(qa.answer_type)
    cols["answers"].append(vqa_answers(qa.answer))
    cols["multiple_choice_answer"].append(qa.answer)
    cols["family"].append(qa.family)
    cols["relation"].append(qa.relation or "")
    cols["scene"].append(scene)


def vsr_relations(cfg: WorldConfig) -> tuple[str, ...]:
    """Relations a VSR caption can use: those the world asks about (`relations`); "between"
    needs scenes with three objects."""
    usable = RELATIONS if cfg.max_objects >= 3 else BINARY_RELATIONS
    rels = tuple(r for r in usable if r in cfg.relations)
    if not rels:
        raise ValueError(
            f"world.scene.relations: {list(cfg.relations)} leaves no VSR relation with "
            f"max_objects {cfg.max_objects} (\"between\" needs 3)"
        )
    return rels


def vsr_caption(rng: np.random.Generator, rel: str, subj: str, obj: str, obj2: str | None) -> str:
    """E.g. "The red circle is to the left of the blue square."."""
    if rel == "between":
        return f"The {subj} is between the {obj} and the {obj2}."
    phrases = RELATION_PHRASES[rel]
    phrase = phrases[int(rng.integers(len(phrases)))]
    return f"The {subj} is {phrase} the {obj}."


def vsr_rows(
    cfg: WorldConfig,
    rng: np.random.Generator,
    n: int,
    *,
    id_offset: int = VSR_ID_OFFSET,
    log: Log = print,
    max_scene_tries: int = 1000,
) -> dict[str, list[Any]]:
    """Columns of `n` VSR rows, one caption per image; relations cycle evenly and labels are
    50/50 within each relation (exactly, up to one row when counts are odd)."""
    if n > 0 and cfg.max_objects < 2:
        raise ValueError("world.max_objects: VSR captions need scenes with at least 2 objects")
    rels = vsr_relations(cfg)
    jobs = [(rels[i % len(rels)], (i // len(rels)) % 2) for i in range(n)]
    jobs = [jobs[int(j)] for j in rng.permutation(n)]
    cols: dict[str, list[Any]] = {c: [] for c in vsr_features()}
    progress = Progress("vsr", n, log)
    for i, (rel, label) in enumerate(jobs):
        for _ in range(max_scene_tries):
            scene = sample_scene(rng, cfg)
            cases = [
                (a, b, c)
                for a, b, c in relation_cases(scene, rel)
                if relation_holds(rel, a, b, cfg, c) == bool(label)
            ]
            if cases:
                break
        else:
            raise RuntimeError(
                f"no scene with a {'true' if label else 'false'} {rel!r} caption in "
                f"{max_scene_tries} draws; check world.near_gap/far_dist/tol"
            )
        a, b, c = cases[int(rng.integers(len(cases)))]
        obj2 = c.name if c is not None else None
        cols["image"].append({"bytes": png_bytes(draw(scene, cfg.font)), "path": None})
        cols["caption"].append(vsr_caption(rng, rel, a.name, b.name, obj2))
        cols["label"].append(label)
        cols["relation"].append(rel)
        cols["subj"].append(a.name)
        cols["obj"].append(b.name)
        cols["obj2"].append(obj2 or "")
        cols["image_id"].append(id_offset + i)
        cols["scene"].append(scene_json(scene))
        progress.update(i + 1)
    return cols


def corpus_rows(
    cfg: WorldConfig,
    rng: np.random.Generator,
    n: int,
    questions_per_scene: int,
    *,
    log: Log = print,
) -> dict[str, list[Any]]:
    """Columns of `n` text-only rows: a scene description and QA pairs drawn as for VQA."""
    cols: dict[str, list[Any]] = {c: [] for c in CORPUS_COLUMNS}
    progress = Progress("corpus", n, log, unit="scenes")
    for i in range(n):
        scene = sample_scene(rng, cfg)
        qas = make_questions(scene, rng, cfg, questions_per_scene)
        cols["description"].append(describe(scene, cfg, rng))
        cols["questions"].append([qa.question for qa in qas])
        cols["answers"].append([qa.answer for qa in qas])
        cols["families"].append([qa.family for qa in qas])
        progress.update(i + 1)
    return cols


def take(cols: Mapping[str, list[Any]], mask: np.ndarray) -> dict[str, list[Any]]:
    """The rows of column lists where `mask` is true."""
    idx = np.flatnonzero(mask)
    return {k: [v[i] for i in idx] for k, v in cols.items()}


# ---------------------------------------------------------------------------------------------
# Summaries


def _yes_fraction(pairs: Iterable[tuple[str, str]]) -> dict[str, float]:
    """Per group, the share of "yes" among (group, answer) yes/no pairs."""
    yes: Counter[str] = Counter()
    total: Counter[str] = Counter()
    for group, answer in pairs:
        total[group] += 1
        yes[group] += answer == "yes"
    return {g: round(yes[g] / total[g], 4) for g in sorted(total)}


def vqa_summary(cols: Mapping[str, list[Any]]) -> dict[str, Any]:
    """Counts per family, relation, answer and question type, and yes/no balance."""
    yn = [
        (fam, rel, ans)
        for fam, rel, ans, typ in zip(
            cols["family"],
            cols["relation"],
            cols["multiple_choice_answer"],
            cols["answer_type"],
            strict=True,
        )
        if typ == "yes/no"
    ]
    n_yes = sum(ans == "yes" for _, _, ans in yn)
    return {
        "rows": len(cols["question_id"]),
        "images": len(set(cols["image_id"])),
        "families": dict(sorted(Counter(cols["family"]).items())),
        "relations": dict(sorted(Counter(r for r in cols["relation"] if r).items())),
        "answer_types": dict(sorted(Counter(cols["answer_type"]).items())),
        "question_types": dict(sorted(Counter(cols["question_type"]).items())),
        "yes_no": {
            "yes": n_yes,
            "no": len(yn) - n_yes,
            "yes_fraction": round(n_yes / len(yn), 4) if yn else None,
        },
        "yes_fraction_by_family": _yes_fraction((f, a) for f, _, a in yn),
        "yes_fraction_by_relation": _yes_fraction((r, a) for _, r, a in yn if r),
    }


def vsr_summary(cols: Mapping[str, list[Any]]) -> dict[str, Any]:
    per_rel: dict[str, dict[str, int]] = {}
    for rel, label in zip(cols["relation"], cols["label"], strict=True):
        counts = per_rel.setdefault(rel, {"true": 0, "false": 0})
        counts["true" if label else "false"] += 1
    return {
        "rows": len(cols["label"]),
        "positive_fraction": round(float(np.mean(cols["label"])), 4) if cols["label"] else None,
        "relations": dict(sorted(per_rel.items())),
    }


def corpus_summary(cols: Mapping[str, list[Any]]) -> dict[str, Any]:
    families = Counter(f for fams in cols["families"] for f in fams)
    return {
        "scenes": len(cols["description"]),
        "questions": sum(len(q) for q in cols["questions"]),
        "families": dict(sorted(families.items())),
    }


# ---------------------------------------------------------------------------------------------
# Entry point


def _check_args(
    n_train: int, n_val: int, n_vsr: int, n_corpus: int, questions_per_image: int
) -> None:
    for key, v in (
        ("n_train", n_train),
        ("n_val", n_val),
        ("n_vsr", n_vsr),
        ("n_corpus", n_corpus),
    ):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0:
            raise ValueError(f"{key}: must be an integer >= 0 (got {v!r})")
    if not 1 <= questions_per_image < QUESTION_ID_STRIDE:
        raise ValueError(
            f"questions_per_image: must lie in [1, {QUESTION_ID_STRIDE - 1}] "
            f"(got {questions_per_image!r})"
        )
    for key, n in (("n_train", n_train), ("n_val", n_val)):
        if -(-n // questions_per_image) > VAL_ID_OFFSET:
            raise ValueError(f"{key}: at most {VAL_ID_OFFSET} images per split (got {n} rows)")
    if n_vsr > VSR_ID_OFFSET:
        raise ValueError(f"n_vsr: at most {VSR_ID_OFFSET} (got {n_vsr})")


def _string_list(key: str, values: Sequence[str]) -> list[str]:
    if isinstance(values, str) or not all(isinstance(v, str) and v.strip() for v in values):
        raise ValueError(f"{key}: must be a list of non-empty strings (got {values!r})")
    if not values:
        raise ValueError(f"{key}: must not be empty")
    return list(values)


def val_world(scene: Mapping[str, Any], family_weights: Mapping[str, float] | None) -> WorldConfig:
    """The world D_base is drawn from: `scene` with its own family weights, if any (families
    they leave out take the schema's defaults)."""
    if family_weights is None:
        return WorldConfig.from_mapping(scene)
    weights = config.section("world.val_family_weights", family_weights)
    return WorldConfig.from_mapping({**scene, "family_weights": weights})


def write_world(
    cfg: Mapping[str, Any],
    seed: int,
    out_dir: Path,
    *,
    n_train: int,
    n_val: int,
    n_vsr: int,
    n_corpus: int,
    questions_per_image: int,
    spatial_keywords: Sequence[str],
    ocr_keywords: Sequence[str],
    neutral_prompts: Sequence[str],
    val_family_weights: Mapping[str, float] | None = None,
    log: Log = print,
) -> dict[str, Any]:
    """Draw the world and write every split into `out_dir`; returns the summary.

    Files: train.parquet, val.parquet (D_base), spatial.parquet and ocr.parquet (val rows whose
    question matches the keywords), vsr.parquet, corpus.parquet, neutral_prompts.json and, last,
    summary.json. `n_train`/`n_val` count question rows. Each split draws from its own child of
    `SeedSequence(seed)`; val never repeats a train scene, and val ids are offset by
    `VAL_ID_OFFSET` so ids are distinct across the two. `val_family_weights` gives D_base its
    own mix of question families (None: the adaptation split's).
    """
    world = WorldConfig.from_mapping(cfg)
    _check_args(n_train, n_val, n_vsr, n_corpus, questions_per_image)
    spatial_keywords = _string_list("spatial_keywords", spatial_keywords)
    ocr_keywords = _string_list("ocr_keywords", ocr_keywords)
    neutral_prompts = _string_list("neutral_prompts", neutral_prompts)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rngs = dict(
        zip(
            SPLIT_STREAMS,
            (
                np.random.default_rng(s)
                for s in np.random.SeedSequence(seed).spawn(len(SPLIT_STREAMS))
            ),
            strict=True,
        )
    )
    t0 = time.monotonic()

    train = vqa_rows(world, rngs["train"], n_train, questions_per_image, name="train", log=log)
    write_parquet(to_dataset(train, vqa_features()), out_dir / "train.parquet")
    val = vqa_rows(
        val_world(cfg, val_family_weights),
        rngs["val"],
        n_val,
        questions_per_image,
        id_offset=VAL_ID_OFFSET,
        exclude=set(train["scene"]),
        name="val",
        log=log,
    )
    write_parquet(to_dataset(val, vqa_features()), out_dir / "val.parquet")
    spatial = take(val, keyword_mask(val["question"], spatial_keywords))
    ocr = take(val, keyword_mask(val["question"], ocr_keywords))
    write_parquet(to_dataset(spatial, vqa_features()), out_dir / "spatial.parquet")
    write_parquet(to_dataset(ocr, vqa_features()), out_dir / "ocr.parquet")
    for name, part in (("spatial", spatial), ("ocr", ocr)):
        if n_val and not part["question"]:
            log(f"warning: the {name} split is empty; check {name}_keywords")

    vsr = vsr_rows(world, rngs["vsr"], n_vsr, log=log)
    write_parquet(to_dataset(vsr, vsr_features()), out_dir / "vsr.parquet")
    corpus = corpus_rows(world, rngs["corpus"], n_corpus, questions_per_image, log=log)
    write_parquet(to_dataset(corpus, corpus_features()), out_dir / "corpus.parquet")
    write_json(neutral_prompts, out_dir / "neutral_prompts.json")

    summary = {
        "seed": seed,
        "world": world.to_dict(),
        "questions_per_image": questions_per_image,
        "val_family_weights": None if val_family_weights is None else dict(val_family_weights),
        "splits": {
            "train": vqa_summary(train),
            "val": vqa_summary(val),
            "spatial": vqa_summary(spatial),
            "ocr": vqa_summary(ocr),
            "vsr": vsr_summary(vsr),
            "corpus": corpus_summary(corpus),
        },
        "neutral_prompts": len(neutral_prompts),
    }
    write_json(summary, out_dir / "summary.json")
    log(f"world written to {out_dir} in {time.monotonic() - t0:.1f} s")
    return summary


def world_job(
    *,
    scene: Mapping[str, Any],
    seed: int,
    sizes: Mapping[str, int],
    questions_per_image: int,
    spatial_keywords: Sequence[str],
    ocr_keywords: Sequence[str],
    neutral_prompts: Sequence[str],
    out: Mapping[str, str | os.PathLike],
    val_family_weights: Mapping[str, float] | None = None,
    log: Log = print,
) -> dict[str, Any]:
    """The `world` rule: `write_world` into the folder of `out["summary"]`, where the rule's
    other outputs (one parquet file per split, `neutral_prompts`) lie; `sizes` has the question
    rows of `train` and `val` and the rows of `vsr` and `corpus`."""
    return write_world(
        scene,
        seed,
        Path(out["summary"]).parent,
        n_train=sizes["train"],
        n_val=sizes["val"],
        n_vsr=sizes["vsr"],
        n_corpus=sizes["corpus"],
        questions_per_image=questions_per_image,
        spatial_keywords=spatial_keywords,
        ocr_keywords=ocr_keywords,
        neutral_prompts=neutral_prompts,
        val_family_weights=val_family_weights,
        log=log,
    )
