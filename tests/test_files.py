"""Atomic writers: a failed write leaves neither a partial output nor a temporary file."""

import pandas as pd
import pytest
from vlmdiff.files import atomic_dir, atomic_path, write_table
from vlmdiff.models.build import save_atomic


def test_atomic_path_publishes_only_on_success(tmp_path):
    out = tmp_path / "sub" / "table.csv"
    with pytest.raises(RuntimeError), atomic_path(out) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed mid-write")
    assert not out.exists() and list(out.parent.iterdir()) == []
    with atomic_path(out) as tmp:
        tmp.write_text("whole")
    assert out.read_text() == "whole" and list(out.parent.iterdir()) == [out]


def test_atomic_dir_keeps_the_previous_output_when_a_rewrite_fails(tmp_path):
    out = tmp_path / "model"
    with atomic_dir(out) as tmp:
        (tmp / "weights").write_text("v1")
    with pytest.raises(RuntimeError), atomic_dir(out) as tmp:
        (tmp / "weights").write_text("v2 (partial)")
        raise RuntimeError("killed mid-save")
    assert (out / "weights").read_text() == "v1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_save_atomic_and_write_table_leave_nothing_on_failure(tmp_path):
    class Broken:
        def save_pretrained(self, d):
            (d / "config.json").write_text("{}")
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        save_atomic([Broken()], tmp_path / "lm")
    with pytest.raises(ValueError, match=r"\.parquet or \.csv"):
        write_table(pd.DataFrame({"a": [1]}), tmp_path / "t.json")
    assert list(tmp_path.iterdir()) == []
