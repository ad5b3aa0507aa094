"""The fault harness's own pieces, without running the workflow (tests/test_reliability.py does)."""

import json

import pandas as pd
import xarray as xr
from vlmdiff.faults import compare_runs, own_state, plan_kills


def _run(root, loss: float, seconds: float, note: str) -> None:
    (root / "tables").mkdir(parents=True)
    pd.DataFrame({"step": [1, 2], "loss": [0.5, loss], "samples_per_s": [seconds, 2.0]}).to_csv(
        root / "tables/history.csv", index=False)
    (root / "summary.json").write_text(json.dumps(
        {"f1": 0.5, "seconds": seconds, "usage": {"calls": int(seconds), "cached": seconds > 1}}))
    xr.Dataset({"score": ("x", [1.0, loss])}, attrs={"exact_s": seconds}).to_netcdf(root / "a.nc")
    (root / "note.txt").write_text(note)
    (root / "logs").mkdir()
    (root / "logs/job.log").write_text(f"took {seconds}")


def test_compare_runs_leaves_out_timings_and_finds_a_changed_value(tmp_path):
    _run(tmp_path / "a", 0.25, 1.0, "same")
    _run(tmp_path / "b", 0.25, 7.0, "same")
    assert compare_runs(tmp_path / "a", tmp_path / "b") == {"tables": [], "other": [],
                                                            "missing": []}
    _run(tmp_path / "c", 0.26, 1.0, "other")
    (tmp_path / "c/extra.csv").write_text("x\n1\n")
    diff = compare_runs(tmp_path / "a", tmp_path / "c")
    assert diff == {"tables": ["a.nc", "tables/history.csv"], "other": ["note.txt"],
                    "missing": ["extra.csv"]}


def test_kill_plans_are_seeded():
    kinds, during = ("train_lm", "adapt_sae"), ("feature_stats", "ablation")
    a = plan_kills(kinds, during, seed=3, resuming=[("adapt_sae", "")])
    assert a == plan_kills(kinds, during, seed=3, resuming=[("adapt_sae", "")])
    assert [k.fraction for k in a] != [k.fraction for k in plan_kills(kinds, during, seed=4)]
    assert [(k.target, k.on_state) for k in a] == [
        ("train_lm", False), ("adapt_sae", False), ("adapt_sae", True), ("snakemake", False)]
    assert all(0.1 <= k.fraction <= 0.6 for k in a if not k.on_state)


def test_own_state_maps_a_job_log_to_what_it_resumes_from(tmp_path):
    chunk = tmp_path / "cache/vlm/train/shard1.zarr.partial/layer_0/c/0/0"
    chunk.parent.mkdir(parents=True)
    chunk.write_bytes(b"x")
    ckpt = tmp_path / "sae/full/layer_3.checkpoint/train_state.pt"
    ckpt.parent.mkdir(parents=True)
    ckpt.write_bytes(b"x")
    logs = "results/tiny/logs"
    assert own_state(f"{logs}/cache/vlm_train_shard1.log", tmp_path) == [
        "cache/vlm/train/shard1.zarr.partial/layer_0/c/0/0"]
    assert own_state(f"{logs}/cache/vlm_train_shard0.log", tmp_path) == []
    assert own_state(f"{logs}/sae/full_layer_3.log", tmp_path) == [
        "sae/full/layer_3.checkpoint/train_state.pt"]
    assert own_state(f"{logs}/train_lm.log", tmp_path) == own_state(None, tmp_path) == []
