"""The VQAv2 and VSR dataset layouts: columns, `datasets` features, loading, keyword filters.

A split is one parquet file (`datasets.Dataset.to_parquet`, images as PNG bytes under the
`datasets.Image()` feature); `load_split` reads any of them back and checks its columns. The
keyword filters select D_sp and D_ocr, for the shapes world and real VQAv2 alike.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from datasets import Dataset, Features, Image, List, Value
from datasets.table import InMemoryTable

VQA_COLUMNS: tuple[str, ...] = (
    "question_id",
    "image_id",
    "image",
    "question",
    "question_type",
    "answer_type",
    "answers",
    "multiple_choice_answer",
)
VQA_EXTRA_COLUMNS: tuple[str, ...] = ("family", "relation", "scene")
VSR_COLUMNS: tuple[str, ...] = ("image", "caption", "label", "relation")
VSR_EXTRA_COLUMNS: tuple[str, ...] = ("subj", "obj", "obj2", "image_id", "scene")
CORPUS_COLUMNS: tuple[str, ...] = ("description", "questions", "answers", "families")
LAYOUTS: dict[str, tuple[str, ...]] = {
    "vqa": VQA_COLUMNS,
    "vsr": VSR_COLUMNS,
    "corpus": CORPUS_COLUMNS,
}


def vqa_features() -> Features:
    """Features of `lmms-lab/VQAv2` plus our ground-truth extras."""
    return Features(
        {
            "question_id": Value("int64"),
            "image_id": Value("int64"),
            "image": Image(),
            "question": Value("string"),
            "question_type": Value("string"),
            "answer_type": Value("string"),
            "answers": List(
                {
                    "answer": Value("string"),
                    "answer_confidence": Value("string"),
                    "answer_id": Value("int64"),
                }
            ),
            "multiple_choice_answer": Value("string"),
            "family": Value("string"),
            "relation": Value("string"),
            "scene": Value("string"),
        }
    )


def vsr_features(extras: Mapping[str, Any] | None = None) -> Features:
    """Features of `cambridgeltl/vsr_random` (image, caption, label, relation) plus `extras`
    (default: the shapes world's object names, image id and scene)."""
    base = {
        "image": Image(),
        "caption": Value("string"),
        "label": Value("int64"),
        "relation": Value("string"),
    }
    if extras is not None:
        return Features({**base, **extras})
    return Features(
        {
            **base,
            "subj": Value("string"),
            "obj": Value("string"),
            "obj2": Value("string"),
            "image_id": Value("int64"),
            "scene": Value("string"),
        }
    )


def corpus_features() -> Features:
    return Features(
        {
            "description": Value("string"),
            "questions": List(Value("string")),
            "answers": List(Value("string")),
            "families": List(Value("string")),
        }
    )


# ---------------------------------------------------------------------------------------------
# Keyword filter


def keyword_pattern(keywords: Sequence[str]) -> re.Pattern[str]:
    """Case-insensitive regex matching any keyword as a whole word or whole phrase.

    Words of a multi-word keyword may be separated by any whitespace; a keyword never matches
    inside a longer word ("left" does not match "leftover", "next to" not "nextto").
    """
    if isinstance(keywords, str):
        raise TypeError("keywords must be a sequence of strings, not one string")
    parts = []
    for kw in keywords:
        words = str(kw).split()
        if not words:
            raise ValueError(f"empty keyword in {list(keywords)!r}")
        parts.append(r"\s+".join(re.escape(w) for w in words))
    if not parts:
        return re.compile(r"(?!x)x")  # matches nothing
    # Longest first so that alternation prefers the full phrase.
    parts.sort(key=len, reverse=True)
    return re.compile(r"(?<!\w)(?:" + "|".join(parts) + r")(?!\w)", re.IGNORECASE)


def keyword_mask(questions: Sequence[str], keywords: Sequence[str]) -> np.ndarray:
    """Boolean mask: which questions contain any keyword as a whole word/phrase."""
    pat = keyword_pattern(keywords)
    return np.fromiter((pat.search(q) is not None for q in questions), bool, len(questions))


# ---------------------------------------------------------------------------------------------
# Reading


def check_columns(
    columns: Iterable[str], required: Sequence[str], source: str | os.PathLike
) -> None:
    """Raise ValueError naming `source` and the missing columns, if any are missing."""
    have = set(columns)
    missing = [c for c in required if c not in have]
    if missing:
        raise ValueError(f"{source}: missing column(s) {missing}; found {sorted(have)}")


def check_vqa_columns(columns: Iterable[str], source: str | os.PathLike) -> None:
    """Raise ValueError unless the VQAv2 columns (`VQA_COLUMNS`) are all present."""
    check_columns(columns, VQA_COLUMNS, source)


def infer_layout(columns: Iterable[str]) -> str | None:
    """ "vqa", "vsr" or "corpus" by the columns present; None when none fits fully."""
    have = set(columns)
    for name, required in LAYOUTS.items():
        if set(required) <= have:
            return name
    return None


def load_split(path: str | os.PathLike, layout: str | None = None) -> Dataset:
    """Read one parquet split (images as PIL via the stored `Image` feature), in memory.

    `layout` ("vqa", "vsr", "corpus") names the columns to require; None infers it and, when
    nothing fits, reports the missing VQAv2 columns. Nothing is written to the HF cache.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"split file not found: {path}")
    try:
        table = pq.read_table(path, memory_map=True)
    except (pa.ArrowInvalid, OSError) as err:
        raise ValueError(f"{path}: not a readable parquet file ({err})") from err
    if layout is None:
        layout = infer_layout(table.column_names) or "vqa"
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; known: {list(LAYOUTS)}")
    check_columns(table.column_names, LAYOUTS[layout], path)
    # Features come from the "huggingface" schema metadata written by to_parquet.
    return Dataset(InMemoryTable(table))
