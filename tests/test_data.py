"""Tests for writing/reading the shapes world as VQAv2- and VSR-layout parquet splits."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from datasets import Dataset
from test_world import PHRASE_TO_REL, ref_answer, ref_relation
from vlmdiff.world.datasets import VAL_ID_OFFSET, write_parquet, write_world
from vlmdiff.world.layouts import VQA_COLUMNS, check_vqa_columns, keyword_mask, load_split
from vlmdiff.world.scenes import FAMILIES, RELATIONS, WorldConfig

WORDS = "left right above below beside between near far under over behind top bottom"
SPATIAL = [*WORDS.split(), "next to", "on top of", "in front of"]
OCR = ["letter", "written", "say", "says", "word", "text"]
PROMPTS = ["Describe the positions of objects in the image.", "Where are the objects?"]
FILES = ("train", "val", "spatial", "ocr", "vsr", "corpus")
SIZES = {"n_train": 240, "n_val": 240, "n_vsr": 140, "n_corpus": 40, "questions_per_image": 3}


def write(out: Path, seed: int = 0, cfg: dict | None = None, **overrides: Any) -> dict:
    kwargs: dict[str, Any] = dict(SIZES, spatial_keywords=SPATIAL, ocr_keywords=OCR)
    kwargs.update(neutral_prompts=PROMPTS, log=lambda _: None)
    kwargs.update(overrides)
    return write_world(cfg or {}, seed, out, **kwargs)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("world")
    return out, write(out)


def table(path: Path) -> pa.Table:
    return pq.read_table(path)


# ---------------------------------------------------------------------------------------------
# keyword_mask


def test_keyword_mask_phrases_and_word_boundaries() -> None:
    qs = [
        "is it next to the box?",
        "is it nextto the box?",
        "is the leftover pizza cold?",
        "what is on the LEFT?",
        "is the cat next\tto the dog?",
        "is it to the right?",
        "what is on top of the table?",
        "is the top open?",
        "is it on the desk?",
    ]
    got = keyword_mask(qs, ["next to", "left", "on top of"])
    assert got.dtype == bool and got.tolist() == [1, 0, 0, 1, 1, 0, 1, 0, 0]
    assert keyword_mask(qs, ["top"]).tolist() == [0, 0, 0, 0, 0, 0, 1, 1, 0]
    assert keyword_mask(qs, []).tolist() == [False] * len(qs)
    assert keyword_mask([], ["left"]).shape == (0,)
    assert keyword_mask(["what does the sign say?"], ["say", "says"]).tolist() == [True]
    assert keyword_mask(["a+b left?"], ["a+b"]).tolist() == [True]  # regex characters escaped
    with pytest.raises(ValueError, match="empty keyword"):
        keyword_mask(qs, ["left", " "])


# ---------------------------------------------------------------------------------------------
# Layout


def test_files_and_summary(world: tuple[Path, dict]) -> None:
    out, summary = world
    names = sorted(p.name for p in out.iterdir())
    expected = [f"{f}.parquet" for f in FILES] + ["neutral_prompts.json", "summary.json"]
    assert names == sorted(expected)  # no temporary files left behind
    assert json.loads((out / "summary.json").read_text()) == summary
    assert json.loads((out / "neutral_prompts.json").read_text()) == PROMPTS
    splits = summary["splits"]
    assert splits["train"]["rows"] == 240 and splits["train"]["images"] == 80
    assert splits["val"]["rows"] == 240 and splits["vsr"]["rows"] == 140
    assert splits["corpus"] == {**splits["corpus"], "scenes": 40, "questions": 120}
    assert splits["spatial"]["rows"] == table(out / "spatial.parquet").num_rows > 0
    assert splits["ocr"]["rows"] == table(out / "ocr.parquet").num_rows > 0
    asked = {f for f, w in WorldConfig.default().family_weights.items() if w > 0}
    assert set(splits["train"]["families"]) == asked and asked < set(FAMILIES)
    assert 0.35 < splits["train"]["yes_no"]["yes_fraction"] < 0.65


def test_vqa_columns_and_dtypes(world: tuple[Path, dict]) -> None:
    schema = table(world[0] / "val.parquet").schema
    assert schema.names[: len(VQA_COLUMNS)] == list(VQA_COLUMNS)
    assert schema.names[len(VQA_COLUMNS) :] == ["family", "relation", "scene"]
    assert schema.field("question_id").type == pa.int64()
    assert schema.field("image_id").type == pa.int64()
    assert schema.field("image").type == pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    answer = pa.struct(
        [("answer", pa.string()), ("answer_confidence", pa.string()), ("answer_id", pa.int64())]
    )
    assert schema.field("answers").type == pa.list_(answer)
    for name in ("question", "question_type", "answer_type", "multiple_choice_answer"):
        assert schema.field(name).type == pa.string()
    features = json.loads(schema.metadata[b"huggingface"])["info"]["features"]
    assert features["image"] == {"_type": "Image"}


def test_round_trip_through_load_split(world: tuple[Path, dict]) -> None:
    ds = load_split(world[0] / "val.parquet")
    assert isinstance(ds, Dataset) and len(ds) == 240
    row = ds[0]
    assert row["image"].size == (48, 48) and row["image"].mode == "RGB"
    assert [a["answer_id"] for a in row["answers"]] == list(range(1, 11))
    assert {a["answer"] for a in row["answers"]} == {row["multiple_choice_answer"]}
    assert {a["answer_confidence"] for a in row["answers"]} == {"yes"}
    vsr = load_split(world[0] / "vsr.parquet")
    assert vsr[0]["image"].size == (48, 48)
    corpus = load_split(world[0] / "corpus.parquet")
    assert set(corpus.column_names) == {"description", "questions", "answers", "families"}
    assert all(len(r["questions"]) == len(r["answers"]) == 3 for r in corpus)


def test_ids_unique_and_train_val_disjoint(world: tuple[Path, dict]) -> None:
    train, val = table(world[0] / "train.parquet"), table(world[0] / "val.parquet")
    for t in (train, val):
        qids = t["question_id"].to_pylist()
        assert len(set(qids)) == len(qids)
    assert not set(train["image_id"].to_pylist()) & set(val["image_id"].to_pylist())
    assert not set(train["question_id"].to_pylist()) & set(val["question_id"].to_pylist())
    assert min(val["image_id"].to_pylist()) >= VAL_ID_OFFSET
    assert not set(train["scene"].to_pylist()) & set(val["scene"].to_pylist())


def test_answers_recomputed_from_stored_scenes(world: tuple[Path, dict]) -> None:
    for split in ("train", "val"):
        for row in table(world[0] / f"{split}.parquet").drop(["image"]).to_pylist():
            answer, rel = ref_answer(json.loads(row["scene"]), row["question"])
            assert row["multiple_choice_answer"] == answer, row
            assert row["relation"] == (rel or "")


def test_keyword_splits_are_val_subsets(world: tuple[Path, dict]) -> None:
    val = table(world[0] / "val.parquet").drop(["image"]).to_pylist()
    for name, words in (("spatial", SPATIAL), ("ocr", OCR)):
        part = table(world[0] / f"{name}.parquet").drop(["image"]).to_pylist()
        mask = keyword_mask([r["question"] for r in val], words)
        assert part == [r for r, keep in zip(val, mask, strict=True) if keep]
    spatial = table(world[0] / "spatial.parquet")["family"].to_pylist()
    assert spatial.count("spatial") / len(spatial) > 0.9


def test_vsr_labels_balanced_and_correct(world: tuple[Path, dict]) -> None:
    rows = table(world[0] / "vsr.parquet").drop(["image"]).to_pylist()
    assert {r["relation"] for r in rows} == set(RELATIONS)
    for rel in RELATIONS:
        labels = [r["label"] for r in rows if r["relation"] == rel]
        assert labels.count(1) == labels.count(0) == 10, rel
    phrases = "|".join(sorted(PHRASE_TO_REL, key=len, reverse=True))
    for r in rows:
        named = {f"{o['colour']} {o['shape']}": o for o in json.loads(r["scene"])["objects"]}
        if r["relation"] == "between":
            m = re.fullmatch(
                r"The (\w+ \w+) is between the (\w+ \w+) and the (\w+ \w+)\.", r["caption"]
            )
            assert m and (m[1], m[2], m[3]) == (r["subj"], r["obj"], r["obj2"])
            truth = ref_relation("between", named[m[1]], named[m[2]], named[m[3]])
        else:
            m = re.fullmatch(rf"The (\w+ \w+) is ({phrases}) the (\w+ \w+)\.", r["caption"])
            assert m and PHRASE_TO_REL[m[2]] == r["relation"], r["caption"]
            assert (m[1], m[3]) == (r["subj"], r["obj"])
            truth = ref_relation(r["relation"], named[m[1]], named[m[3]])
        assert r["label"] == int(truth), r


# ---------------------------------------------------------------------------------------------
# Determinism and robustness


def test_same_seed_same_contents_other_seed_differs(
    world: tuple[Path, dict], tmp_path: Path
) -> None:
    write(tmp_path / "again", seed=0)
    write(tmp_path / "other", seed=1)
    for f in FILES:
        ref = table(world[0] / f"{f}.parquet")
        assert table(tmp_path / "again" / f"{f}.parquet").equals(ref), f
        assert not table(tmp_path / "other" / f"{f}.parquet").equals(ref), f


def test_load_split_errors(tmp_path: Path, world: tuple[Path, dict]) -> None:
    missing = tmp_path / "nope.parquet"
    with pytest.raises(FileNotFoundError, match="nope.parquet"):
        load_split(missing)
    partial = tmp_path / "partial.parquet"
    pq.write_table(table(world[0] / "val.parquet").drop(["answers", "question_type"]), partial)
    with pytest.raises(
        ValueError, match=r"partial\.parquet: missing .*\['question_type', 'answers'\]"
    ):
        load_split(partial)
    with pytest.raises(ValueError, match="answers"):
        load_split(partial, layout="vqa")
    junk = tmp_path / "junk.parquet"
    junk.write_text("not parquet")
    with pytest.raises(ValueError, match="junk.parquet"):
        load_split(junk)
    with pytest.raises(ValueError, match=r"x\.parquet.*\['question_id'"):
        check_vqa_columns(["image"], "x.parquet")


def test_interrupted_write_leaves_no_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ds = Dataset.from_dict({"a": [1, 2, 3]})

    def broken(self: Dataset, path: str, **_: Any) -> None:
        Path(path).write_bytes(b"PAR1 partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(Dataset, "to_parquet", broken)
    with pytest.raises(KeyboardInterrupt):
        write_parquet(ds, tmp_path / "x.parquet")
    assert list(tmp_path.iterdir()) == []


def test_bad_arguments_name_the_key(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"'world\.scene\.max_objects'"):
        write(tmp_path, cfg={"max_objects": 9})
    with pytest.raises(ValueError, match="spatial_keywords"):
        write(tmp_path, spatial_keywords=[])
    with pytest.raises(ValueError, match="questions_per_image"):
        write(tmp_path, questions_per_image=0)
    assert not list(tmp_path.iterdir())


def test_progress_is_logged(tmp_path: Path) -> None:
    lines: list[str] = []
    write(tmp_path, n_train=30, n_val=30, log=lines.append)
    assert any(re.match(r"train: 30/30 rows \([\d,.]+ rows/s, \d+s elapsed, ETA 0s\)", line) for line in lines)


def test_val_family_weights_change_d_base_only(world: tuple[Path, dict], tmp_path: Path) -> None:
    summary = write(tmp_path, val_family_weights={"spatial": 1.0, "colour": 0, "shape": 0,
                                                  "count": 0, "existence": 0, "ocr": 0})
    for f in ("train", "vsr", "corpus"):
        assert table(tmp_path / f"{f}.parquet").equals(table(world[0] / f"{f}.parquet")), f
    val = table(tmp_path / "val.parquet")["family"].to_pylist()
    # a scene with one object has no relation to ask, so its family is redrawn
    assert val.count("spatial") / len(val) > 0.75 and len(val) == SIZES["n_val"]
    before = table(world[0] / "val.parquet")["family"].to_pylist()
    assert before.count("spatial") / len(before) < 0.6
    assert summary["val_family_weights"]["spatial"] == 1.0
    with pytest.raises(ValueError, match=r"world\.val_family_weights\.spatail"):
        write(tmp_path / "bad", val_family_weights={"spatail": 1.0})


def test_vsr_asks_the_worlds_relations(tmp_path: Path) -> None:
    write(tmp_path, cfg={"relations": ["left of", "below"]}, n_vsr=20)
    rows = table(tmp_path / "vsr.parquet").drop(["image"]).to_pylist()
    assert sorted(r["relation"] for r in rows) == ["below"] * 10 + ["left of"] * 10
    with pytest.raises(ValueError, match=r"relations.*between.*needs 3"):
        write(tmp_path / "bad", cfg={"relations": ["between"], "max_objects": 2})
