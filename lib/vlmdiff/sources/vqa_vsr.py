"""VQAv2 (the `lmms-lab/VQAv2` parquet layout) and VSR (`cambridgeltl/vsr_*` JSONL + COCO images)
imported into the splits the shapes world writes, so everything downstream is one code path.

`lmms-lab/VQAv2` has `validation`, `testdev` and `test` splits (no `train`). D_base is drawn from
`validation` (COCO val2014 images); the adaptation samples default to `test` (COCO test2015
images: questions without answers, which SAE adaptation does not need), so the two never share an
image. Rows of the adaptation split whose `image_id` also occurs in the base split are dropped
all the same, and counted. `spatial` and `ocr` are the base split's questions that match the
keyword filters of the shapes world (`vlmdiff.world.layouts.keyword_mask`), taken from the whole split.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from datasets import Features, Value

from vlmdiff.files import atomic_path
from vlmdiff.logs import Log
from vlmdiff.world import layouts
from vlmdiff.world.layouts import VQA_COLUMNS, keyword_mask, vqa_features

VSR_IMPORT_COLUMNS: tuple[str, ...] = ("image", "caption", "label", "relation", "image_link", "image_file")
VSR_JSON_KEYS: tuple[str, ...] = ("image", "caption", "label", "relation")
COCO_SUBFOLDERS: tuple[str, ...] = ("", "train2017", "val2017", "train2014", "val2014")
MISSING_CHOICES = ("fail", "skip")
_ID_COLUMNS = ["question_id", "image_id", "question"]


class DataFormatError(ValueError):
    """A data source is not in the expected layout; the message names the file and column."""


# ------------------------------------------------------------------------------------ VQAv2


def real_vqa_features() -> Features:
    """The `lmms-lab/VQAv2` features (our VQA layout without the shapes world's extras)."""
    full = vqa_features()
    return Features({c: full[c] for c in VQA_COLUMNS})


VQAV2_FILES = "data/{split}-*.parquet"  # the lmms-lab/VQAv2 layout


def vqav2_patterns(splits: Sequence[str]) -> list[str]:
    """The files of `splits` in the `lmms-lab/VQAv2` layout (to fetch only those from the Hub)."""
    return [VQAV2_FILES.format(split=s) for s in splits]


def vqav2_files(root: str | os.PathLike, split: str) -> list[Path]:
    """The parquet files of `split` under `root` (`data/{split}-*.parquet`, or at the top)."""
    root = Path(root)
    pattern = VQAV2_FILES.format(split=split)
    files = sorted(root.glob(pattern)) or sorted(root.glob(Path(pattern).name))
    if not files:
        found = sorted({p.name.split("-")[0] for p in root.glob("**/*.parquet")})
        raise FileNotFoundError(
            f"{root}: no parquet files of split {split!r} ({pattern}); "
            f"splits found: {found or 'none'}"
        )
    return files


def _index(files: Sequence[Path]) -> pa.Table:
    """`question_id, image_id, question` of every row, with its file and row number."""
    parts = []
    for f, path in enumerate(files):
        try:
            names = pq.read_schema(path).names
        except (pa.ArrowInvalid, OSError) as e:
            raise DataFormatError(f"{path}: not a readable parquet file ({e})") from e
        missing = [c for c in VQA_COLUMNS if c not in names]
        if missing:
            raise DataFormatError(f"{path}: missing column(s) {missing}; found {names}")
        t = pq.read_table(path, columns=_ID_COLUMNS)
        n = t.num_rows
        t = t.append_column("file", pa.array(np.full(n, f, np.int32)))
        parts.append(t.append_column("row", pa.array(np.arange(n, dtype=np.int64))))
    return pa.concat_tables(parts)


def _write_rows(
    files: Sequence[Path], index: pa.Table, out: Path, features: Features, log: Log, name: str
) -> int:
    """The rows `index` names (`file`, `row`), read file by file, written in `index` order."""
    schema = features.arrow_schema
    order = np.asarray(index["file"]), np.asarray(index["row"])
    done = 0
    t0 = time.monotonic()
    with atomic_path(out) as tmp, pq.ParquetWriter(tmp, schema) as writer:
        for f in np.unique(order[0]):  # index is sorted by file, so order is kept
            rows = order[1][order[0] == f]
            table = pq.read_table(files[f], columns=list(VQA_COLUMNS)).take(pa.array(rows))
            writer.write_table(_cast(table.select(list(VQA_COLUMNS)), schema, files[f]))
            done += len(rows)
            log(f"{name}: {done}/{len(index)} rows ({time.monotonic() - t0:.0f} s)")
    return done


def _cast(table: pa.Table, schema: pa.Schema, source: Path) -> pa.Table:
    try:
        return table.cast(schema)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
        raise DataFormatError(f"{source}: columns do not fit the VQAv2 layout ({e})") from e


def _sample(n: int, k: int, rng: np.random.Generator) -> np.ndarray:
    """Sorted positions of `k` rows drawn without replacement from `n` (all when k is 0)."""
    if k == 0 or k >= n:
        return np.arange(n)
    return np.sort(rng.choice(n, size=k, replace=False))


def import_vqav2(
    root: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    adapt_split: str,
    adapt_samples: int,
    base_split: str,
    base_samples: int,
    contrast_samples: int,
    spatial_keywords: Sequence[str],
    ocr_keywords: Sequence[str],
    seed: int,
    log: Log = print,
) -> dict[str, Any]:
    """Write `train` (adaptation), `val` (D_base), `spatial` and `ocr` parquet files into
    `out_dir`; returns the summary. Sample counts of 0 keep every row."""
    if adapt_split == base_split:
        raise ValueError(
            f"source.vqav2: adapt_split and base_split are both {base_split!r}; D_base must be "
            "kept apart from the adaptation samples"
        )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    features = real_vqa_features()
    base_files, adapt_files = vqav2_files(root, base_split), vqav2_files(root, adapt_split)
    base, adapt = _index(base_files), _index(adapt_files)
    log(f"{base_split}: {base.num_rows} rows; {adapt_split}: {adapt.num_rows} rows")

    shared = pc.is_in(adapt["image_id"], value_set=pc.unique(base["image_id"]))
    n_shared = int(pc.sum(shared).as_py() or 0)
    if n_shared:
        log(f"{adapt_split}: dropping {n_shared} rows whose image is also in {base_split}")
        adapt = adapt.filter(pc.invert(shared))
    questions = base["question"].to_pylist()
    masks = {
        "spatial": keyword_mask(questions, spatial_keywords),
        "ocr": keyword_mask(questions, ocr_keywords),
    }
    chosen = {
        "train": adapt.take(pa.array(_sample(adapt.num_rows, adapt_samples, rng))),
        "val": base.take(pa.array(_sample(base.num_rows, base_samples, rng))),
    }
    for name, mask in masks.items():
        hits = base.filter(pa.array(mask))
        chosen[name] = hits.take(pa.array(_sample(hits.num_rows, contrast_samples, rng)))
    files = {"train": adapt_files, "val": base_files, "spatial": base_files, "ocr": base_files}
    counts = {
        name: _write_rows(files[name], rows, out_dir / f"{name}.parquet", features, log, name)
        for name, rows in chosen.items()
    }
    return {
        "source": str(root),
        "adapt_split": adapt_split,
        "base_split": base_split,
        "rows": counts,
        "images": {n: len(set(r["image_id"].to_pylist())) for n, r in chosen.items()},
        "keyword_hits_in_base_split": {n: int(m.sum()) for n, m in masks.items()},
        "base_split_rows": base.num_rows,
        "adapt_rows_dropped_for_shared_images": n_shared,
        "answer_types": dict(Counter(chosen_answer_types(base_files, chosen["val"]))),
    }


def chosen_answer_types(files: Sequence[Path], index: pa.Table) -> list[str]:
    """`answer_type` of the rows `index` names."""
    out: list[str] = []
    f_col, r_col = np.asarray(index["file"]), np.asarray(index["row"])
    for f in np.unique(f_col):
        types = pq.read_table(files[f], columns=["answer_type"])["answer_type"]
        out += types.take(pa.array(r_col[f_col == f])).to_pylist()
    return [t or "" for t in out]


# ------------------------------------------------------------------------------------ VSR


def vsr_features() -> Features:
    """VSR's columns with the image embedded, plus where it came from."""
    return layouts.vsr_features({"image_link": Value("string"), "image_file": Value("string")})


def read_vsr_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Rows of a VSR JSONL file, each checked for `image, caption, label, relation`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"VSR file {path} is missing")
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataFormatError(f"{path}:{n}: not valid JSON ({e})") from e
        missing = [k for k in VSR_JSON_KEYS if k not in row]
        if missing:
            raise DataFormatError(f"{path}:{n}: missing key(s) {missing}")
        if row["label"] not in (0, 1, True, False):
            raise DataFormatError(f"{path}:{n}: label must be 0 or 1, got {row['label']!r}")
        rows.append(row)
    return rows


def find_image(coco: Path, row: Mapping[str, Any]) -> Path | None:
    """The COCO image of a VSR row: by name in `coco` or its usual subfolders, or by the
    subfolder its `image_link` names."""
    name = str(row["image"])
    link = str(row.get("image_link") or "")
    candidates = [coco / sub / name for sub in COCO_SUBFOLDERS]
    if link:
        parts = link.rstrip("/").split("/")
        candidates.insert(0, coco / parts[-2] / parts[-1] if len(parts) >= 2 else coco / parts[-1])
    return next((p for p in candidates if p.is_file()), None)


def vsr_jsonl(source: str | os.PathLike, split: str) -> Path:
    """`source` itself if it is a file, else `source/{split}.jsonl`."""
    source = Path(source)
    return source if source.is_file() else source / f"{split}.jsonl"


def import_vsr(
    source: str | os.PathLike,
    coco_dir: str | os.PathLike,
    out_path: str | os.PathLike,
    *,
    split: str,
    samples: int,
    missing_images: str,
    seed: int,
    log: Log = print,
) -> dict[str, Any]:
    """Join VSR rows to their COCO images and write them as one parquet split; returns the
    summary. Missing images stop the job (`missing_images: fail`) before anything is read or
    written, or are skipped and counted (`skip`)."""
    if missing_images not in MISSING_CHOICES:
        raise ValueError(f"source.vsr.missing_images must be one of {MISSING_CHOICES}, got {missing_images!r}")
    coco = Path(coco_dir)
    if not coco.is_dir():
        raise FileNotFoundError(f"config key 'source.vsr.coco_images': {coco} is not a folder")
    path = vsr_jsonl(source, split)
    rows = read_vsr_jsonl(path)
    found = [find_image(coco, r) for r in rows]
    lost = [r["image"] for r, f in zip(rows, found, strict=True) if f is None]
    if lost and missing_images == "fail":
        raise FileNotFoundError(
            f"{len(lost)} of {len(rows)} VSR images of {path} are not under {coco} "
            f"(e.g. {lost[:5]}); fetch them, or set source.vsr.missing_images: skip"
        )
    if lost:
        log(f"warning: skipping {len(lost)} of {len(rows)} VSR rows whose image is missing: {lost[:5]}")
    kept = [(r, f) for r, f in zip(rows, found, strict=True) if f is not None]
    pick = _sample(len(kept), samples, np.random.default_rng(seed))
    kept = [kept[i] for i in pick]
    cols: dict[str, list[Any]] = {c: [] for c in VSR_IMPORT_COLUMNS}
    for row, file in kept:
        cols["image"].append({"bytes": file.read_bytes(), "path": file.name})
        cols["caption"].append(str(row["caption"]))
        cols["label"].append(int(row["label"]))
        cols["relation"].append(str(row["relation"]))
        cols["image_link"].append(str(row.get("image_link") or ""))
        cols["image_file"].append(str(file.relative_to(coco)))
    table = pa.Table.from_pydict(cols, schema=vsr_features().arrow_schema)
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        pq.write_table(table, tmp)
    labels = np.asarray(cols["label"])
    return {
        "source": str(path),
        "coco_images": str(coco),
        "rows_in_source": len(rows),
        "missing_images": len(lost),
        "missing_examples": lost[:20],
        "missing_policy": missing_images,
        "rows": len(kept),
        "positive_fraction": round(float(labels.mean()), 4) if len(labels) else None,
        "relations": dict(sorted(Counter(cols["relation"]).items())),
    }


def import_vqav2_job(
    *,
    vqav2: Mapping[str, Any],
    revision: str | None,
    spatial_keywords: Sequence[str],
    ocr_keywords: Sequence[str],
    neutral_prompts: Sequence[str],
    seed: int,
    out: Mapping[str, str | os.PathLike],
    log: Log = print,
) -> dict[str, Any]:
    """The `import_vqav2` rule: the `source.vqav2` section's `path` (a local folder, or a Hub
    id whose two splits are fetched), `import_vqav2` into the folder of `out["train"]`, then
    `out["neutral_prompts"]` and `out["summary"]`."""
    from vlmdiff.sources.llava_more import resolve_source
    from vlmdiff.world.datasets import write_json

    splits = [vqav2["adapt_split"], vqav2["base_split"]]
    root = resolve_source(vqav2["path"], "source.vqav2.path", revision=revision,
                          allow_patterns=vqav2_patterns(splits))
    summary = import_vqav2(
        root,
        Path(out["train"]).parent,
        adapt_split=vqav2["adapt_split"],
        adapt_samples=vqav2["adapt_samples"],
        base_split=vqav2["base_split"],
        base_samples=vqav2["base_samples"],
        contrast_samples=vqav2["contrast_samples"],
        spatial_keywords=spatial_keywords,
        ocr_keywords=ocr_keywords,
        seed=seed,
        log=log,
    )
    write_json(list(neutral_prompts), out["neutral_prompts"])
    write_json(summary, out["summary"])
    return summary


def import_vsr_job(
    *,
    vsr: Mapping[str, Any],
    revision: str | None,
    seed: int,
    out: Mapping[str, str | os.PathLike],
    log: Log = print,
) -> dict[str, Any]:
    """The `import_vsr` rule: the `source.vsr` section's `path` (a local folder, or a Hub id
    whose JSONL files are fetched), `import_vsr` into `out["vsr"]`, then `out["summary"]`."""
    from vlmdiff.sources.llava_more import resolve_source
    from vlmdiff.world.datasets import write_json

    source = resolve_source(vsr["path"], "source.vsr.path", revision=revision,
                            allow_patterns=["*.jsonl"])
    summary = import_vsr(
        source,
        vsr["coco_images"],
        out["vsr"],
        split=vsr["split"],
        samples=vsr["samples"],
        missing_images=vsr["missing_images"],
        seed=seed,
        log=log,
    )
    write_json(summary, out["summary"])
    return summary
