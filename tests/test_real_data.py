import json

import pyarrow.parquet as pq
import pytest
from paper_fixtures import QUESTIONS, VSR_ROWS, write_vqav2, write_vsr
from PIL import Image
from vlmdiff.sources.vqa_vsr import DataFormatError, import_vqav2, import_vsr, vqav2_files
from vlmdiff.world.layouts import VQA_COLUMNS, keyword_mask, load_split

SPATIAL = ["left", "right", "on top of", "behind"]
OCR = ["say", "says", "written"]


def vqa_import(root, out, **kw):
    args = dict(adapt_split="test", adapt_samples=10, base_split="validation", base_samples=0,
                contrast_samples=0, spatial_keywords=SPATIAL, ocr_keywords=OCR, seed=0,
                log=lambda s: None)
    return import_vqav2(root, out, **{**args, **kw})


def test_vqav2_splits_layout_and_keyword_filters(tmp_path):
    root = write_vqav2(tmp_path / "vqav2", {"validation": 24, "test": 30})
    summary = vqa_import(root, tmp_path / "world")
    train = load_split(tmp_path / "world/train.parquet", "vqa")
    val = load_split(tmp_path / "world/val.parquet", "vqa")
    assert list(train.column_names) == list(VQA_COLUMNS)
    assert len(train) == 10 and len(val) == 24
    assert not set(train["image_id"]) & set(val["image_id"])
    assert isinstance(val[0]["image"], Image.Image) and val[0]["image"].size == (40, 30)
    assert val[0]["answers"][0]["answer_id"] == 1 and train[0]["multiple_choice_answer"] is None
    spatial = load_split(tmp_path / "world/spatial.parquet", "vqa")
    ocr = load_split(tmp_path / "world/ocr.parquet", "vqa")
    # the same keyword filter as the shapes world: whole words, over the base split
    expected = keyword_mask(val["question"], SPATIAL)
    assert sorted(spatial["question_id"]) == sorted(q for q, m in zip(val["question_id"], expected, strict=True) if m)
    n_spatial = sum(bool(keyword_mask([q[0]], SPATIAL)[0]) for q in QUESTIONS)
    assert 0 < len(spatial) == 24 * n_spatial // len(QUESTIONS)
    assert set(ocr["question"]) == {"What does the sign say?"}
    assert summary["rows"] == {"train": 10, "val": 24, "spatial": len(spatial), "ocr": len(ocr)}
    # real column types survive: int64 ids, the answers list of structs
    schema = pq.read_schema(tmp_path / "world/val.parquet")
    assert str(schema.field("question_id").type) == "int64"
    assert "answer_id" in str(schema.field("answers").type)


def test_vqav2_shared_images_dropped_and_bad_layouts_named(tmp_path):
    root = write_vqav2(tmp_path / "vqav2", {"validation": 12, "test": 12})
    # copy a validation file into the test split: its images are shared
    src = sorted((root / "data").glob("validation-*"))[0]
    (root / "data" / "test-00009-of-00009.parquet").write_bytes(src.read_bytes())
    summary = vqa_import(root, tmp_path / "w", adapt_samples=0)
    n_shared = pq.read_metadata(src).num_rows
    assert summary["adapt_rows_dropped_for_shared_images"] == n_shared
    assert summary["rows"]["train"] == 12
    with pytest.raises(FileNotFoundError, match="train"):
        vqav2_files(root, "train")
    with pytest.raises(ValueError, match="apart"):
        vqa_import(root, tmp_path / "w2", adapt_split="validation")
    bad = tmp_path / "bad" / "data"
    bad.mkdir(parents=True)
    pq.write_table(pq.read_table(src).drop_columns(["question"]), bad / "validation-0.parquet")
    (bad / "test-0.parquet").write_bytes(src.read_bytes())
    with pytest.raises(DataFormatError, match="question"):
        vqa_import(bad.parent, tmp_path / "w3")


def test_vsr_joined_to_coco_missing_images_fail_or_skip(tmp_path):
    vsr = write_vsr(tmp_path / "vsr", tmp_path / "coco", missing=2)
    out = tmp_path / "world/vsr.parquet"
    with pytest.raises(FileNotFoundError, match=r"2 of 6 .*missing_images: skip"):
        import_vsr(vsr, tmp_path / "coco", out, split="test", samples=0, missing_images="fail",
                   seed=0, log=lambda s: None)
    assert not out.exists()
    summary = import_vsr(vsr, tmp_path / "coco", out, split="test", samples=0,
                         missing_images="skip", seed=0, log=lambda s: None)
    assert summary["missing_images"] == 2 and summary["rows"] == 4
    assert summary["missing_examples"] == [r[0] for r in VSR_ROWS[-2:]]
    ds = load_split(out, "vsr")
    assert len(ds) == 4 and ds[0]["image"].size == (48, 32)
    assert list(ds["caption"]) == [r[1] for r in VSR_ROWS[:4]]
    assert list(ds["label"]) == [r[2] for r in VSR_ROWS[:4]]
    assert ds["image_file"][1] == "val2017/" + VSR_ROWS[1][0]  # found through image_link
    json.dumps(summary)


def test_vsr_malformed_rows_named(tmp_path):
    vsr = write_vsr(tmp_path / "vsr", tmp_path / "coco")
    lines = (vsr / "test.jsonl").read_text().splitlines()
    row = json.loads(lines[2])
    del row["relation"]
    lines[2] = json.dumps(row)
    (vsr / "test.jsonl").write_text("\n".join(lines))
    with pytest.raises(DataFormatError, match=r"test.jsonl:3: missing key\(s\) \['relation'\]"):
        import_vsr(vsr, tmp_path / "coco", tmp_path / "o.parquet", split="test", samples=0,
                   missing_images="skip", seed=0)
