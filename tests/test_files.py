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


def test_temporaries_a_killed_job_left_are_removed_on_the_next_write(tmp_path):
    # what a SIGKILLed job leaves: its temporary names, under another process id
    (tmp_path / ".table.tmp99999.csv").write_text("partial")
    (tmp_path / ".model.tmp99999").mkdir()
    (tmp_path / ".model.tmp99999" / "weights").write_text("partial")
    (tmp_path / ".other.tmp99999.csv").write_text("someone else's")
    write_table(pd.DataFrame({"a": [1]}), tmp_path / "table.csv")
    with atomic_dir(tmp_path / "model") as tmp:
        (tmp / "weights").write_text("whole")
    with atomic_dir(tmp_path / "model") as tmp:  # a rewrite swaps the old folder out
        (tmp / "weights").write_text("whole again")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.tmp99999.csv", "model",
                                                         "table.csv"]
    assert (tmp_path / "model" / "weights").read_text() == "whole again"


def test_safetensors_files_get_the_umask_mode(tmp_path):
    import os

    import torch
    from safetensors.torch import save_file
    from vlmdiff.files import atomic_dir

    mask = os.umask(0o022)
    try:
        with atomic_dir(tmp_path / "model") as tmp:
            (tmp / "sub").mkdir()
            save_file({"w": torch.zeros(2)}, str(tmp / "sub" / "model.safetensors"))
            (tmp / "config.json").write_text("{}")
            os.chmod(tmp / "sub" / "model.safetensors", 0o600)  # as safetensors 0.8 writes
    finally:
        os.umask(mask)
    assert (tmp_path / "model/sub/model.safetensors").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "model/config.json").stat().st_mode & 0o777 == 0o644
