"""The tiny workflow under faults, for real: jobs and Snakemake SIGKILLed at seeded moments and
resumed, a second run on the same folder, damaged inputs, a full disk; against an uninterrupted
run of the same seed. Slow (two runs of the tiny DAG, one killed 13 times, and single jobs): `.ci/run` runs it
as its own step, `python -m pytest -m reliability`. VLMDIFF_FAULT_SEED draws other kill moments.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import zarr
from vlmdiff.faults import (
    LONG_JOB_KINDS,
    RESUMING_JOBS,
    SNAKEMAKE_KILL_DURING,
    Workflow,
    compare_runs,
    kill_and_resume,
    plan_kills,
    result_files,
    watch_durations,
)

pytestmark = pytest.mark.reliability

SEED = int(os.environ.get("VLMDIFF_FAULT_SEED", "0"))
RESULTS = "results/tiny"


def _workflow(root: Path, workdir: Path) -> Workflow:
    return Workflow(root / "Snakefile", workdir, root / "presets/tiny.yaml", cores=2)


@pytest.fixture(scope="module")
def reference(root, tmp_path_factory):
    """An uninterrupted run of the tiny preset, its jobs timed by script."""
    workdir = tmp_path_factory.mktemp("reference")
    durations = watch_durations(_workflow(root, workdir), workdir.parent / "reference.txt")
    return workdir, durations


@pytest.fixture(scope="module")
def campaign(root, reference, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("killed")
    wf = _workflow(root, workdir)
    kills = plan_kills(LONG_JOB_KINDS, SNAKEMAKE_KILL_DURING, seed=SEED, resuming=RESUMING_JOBS)
    done = kill_and_resume(wf, workdir / RESULTS, kills, reference[1], workdir.parent / "runs")
    summary = done.summary()
    print(json.dumps(summary, indent=1))
    (workdir.parent / "campaign.json").write_text(json.dumps(summary, indent=1))
    return workdir, done


def test_every_kind_killed_and_the_run_finishes(campaign, capsys):
    workdir, done = campaign
    summary = done.summary()
    with capsys.disabled():  # say what was tried, pass or fail
        print(f"\nkill campaign, seed {SEED}: {summary['kills_made']} of "
              f"{summary['kills_planned']} kills made, {summary['resumed_from_checkpoint']} jobs "
              f"resumed from their state, {summary['runs']} runs, second run refused: "
              f"{summary['second_run_refused']}")
    missed = [k.target if k.target != "snakemake" else f"snakemake during {k.during}"
              for k in done.kills if not k.killed]
    assert not missed, f"never killed (their jobs ended before the drawn moment): {missed}"
    assert len(done.kills) == len(LONG_JOB_KINDS) + len(RESUMING_JOBS) + 1
    # the kill of Snakemake itself leaves its lock; the re-run needs --unlock
    assert any("unlock" in k.reruns for k in done.kills)
    nothing_left = _wf_dry_run(workdir)
    assert "Nothing to be done" in nothing_left, nothing_left[-2000:]


def _wf_dry_run(workdir: Path) -> str:
    root = Path(__file__).resolve().parents[1]
    proc = _workflow(root, workdir).run("-n")
    return proc.stdout + proc.stderr


def test_second_run_on_the_folder_is_refused(campaign):
    _, done = campaign
    assert done.second_run_refused is not None
    assert "cannot be locked" in done.second_run_refused


def test_jobs_that_resume_say_so(campaign):
    _, done = campaign
    with_state = [k for k in done.kills if k.killed and k.resumed is not None]
    assert all(k.resumed for k in with_state), [
        (k.target, k.job_log, k.resumable) for k in with_state if not k.resumed]
    # at least the kills made once a job had state: a cache shard, an SAE, auto-interp
    assert {k.target for k in with_state} >= {kind for kind, _ in RESUMING_JOBS}


def test_killed_and_resumed_run_equals_the_uninterrupted_one(reference, campaign):
    """Also the determinism check: two runs of one seed, compared file by file."""
    diff = compare_runs(reference[0] / RESULTS, campaign[0] / RESULTS)
    assert not diff["missing"], diff["missing"]
    assert not diff["tables"], diff["tables"]
    # every other file byte for byte (caches, SAEs, models, figures), but the report, which
    # shows the jobs' wall times
    assert set(diff["other"]) <= {"report.html"}, diff["other"]


def test_no_temporary_litter_after_kills(campaign):
    workdir, _ = campaign
    litter = [n for n in result_files(workdir / RESULTS) if ".tmp" in n or ".partial" in n]
    litter += [str(p) for p in (workdir / RESULTS).rglob("*") if p.name.startswith(".")
               and (".tmp" in p.name or p.name.endswith(".partial"))]
    assert not litter, litter


# ------------------------------------------------------------------------------ damaged inputs


def _copy_run(reference, tmp_path) -> Path:
    workdir = tmp_path / "run"
    shutil.copytree(reference[0], workdir, symlinks=True)
    return workdir


def _damage(path: Path, how: str) -> None:
    raw = bytearray(path.read_bytes())
    if how == "truncate":
        raw = raw[: len(raw) // 2]
    else:  # the first quote of a JSON or safetensors header; mid-file for binary chunks
        at = raw.find(b'"')
        raw[at if at >= 0 else len(raw) // 2] ^= 0x10
    path.write_bytes(bytes(raw))


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink()


# (what, damaged file, how, a job that reads it: its output, what its message must say)
DAMAGE = [
    ("zarr chunk", "cache/lm/val/shard0.zarr/layer_0/c/0/0", "flip", "sae/base/layer_0",
     "cache/lm/val/shard0.zarr: layer_0 rows 0:"),
    ("zarr chunk", "cache/vlm/val/shard0.zarr/layer_1/c/0/0", "truncate",
     "features/stats/layer_1.nc", "cache/vlm/val/shard0.zarr: layer_1 rows 0:1024 cannot be read"),
    ("final.safetensors", "sae/base/layer_0/checkpoints/final.safetensors", "truncate",
     "sae/text/layer_0",
     "sae/base/layer_0/checkpoints/final.safetensors: not a readable safetensors file"),
    ("hyperparams.json", "sae/base/layer_1/hyperparams.json", "truncate", "sae/full/layer_1",
     "sae/base/layer_1/hyperparams.json: not valid JSON"),
    ("parquet split", "world/val.parquet", "truncate", "models/vlm_eval.csv",
     "world/val.parquet: not a readable parquet file"),
    ("model config.json", "models/lm/config.json", "flip", "cache/lm/val/shard0.zarr",
     "models/lm: the saved LM cannot be loaded"),
]


@pytest.mark.parametrize(("what", "damaged", "how", "output", "says"), DAMAGE,
                         ids=[f"{d[0]}-{d[2]}" for d in DAMAGE])
def test_damaged_input_stops_the_job_naming_the_file(root, reference, tmp_path, what, damaged,
                                                     how, output, says):
    workdir = _copy_run(reference, tmp_path)
    results = workdir / RESULTS
    _remove(results / output)
    _damage(results / damaged, how)
    proc = _workflow(root, workdir).run(f"{RESULTS}/{output}")
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0, text[-3000:]
    assert says in text, text[-3000:]
    assert not (results / output).exists()
    siblings = [p.name for p in (results / output).parent.iterdir()
                if p.name.startswith(f".{Path(output).name}")]
    assert not siblings, siblings


# ------------------------------------------------------------------------------ a full disk


def _file_size_limit(limit: int):
    def set_limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return set_limit


def _store_arrays(path: Path) -> dict[str, np.ndarray]:
    group = zarr.open_group(path, mode="r")
    return {name: array[:] for name, array in group.arrays()}


FULL = [
    # (output, its largest file, a limit under it)
    ("cache/lm/val/shard0.zarr", "layer_0/c/0/0", "cache"),
    ("sae/full/layer_0", "checkpoints/final.safetensors", "sae"),
]


@pytest.mark.parametrize(("output", "big_file", "kind"), FULL, ids=[f[2] for f in FULL])
def test_full_disk_fails_the_job_and_the_rerun_completes(root, reference, tmp_path, output,
                                                         big_file, kind):
    workdir = _copy_run(reference, tmp_path)
    results = workdir / RESULTS
    done = results / output
    size = (done / big_file).stat().st_size
    _remove(done)
    if kind == "sae":
        shutil.rmtree(results / (output + ".checkpoint"), ignore_errors=True)
    wf = _workflow(root, workdir)
    # Python ignores SIGXFSZ, so a write past RLIMIT_FSIZE fails with EFBIG as on a full disk
    full = wf.run(f"{RESULTS}/{output}", preexec=_file_size_limit(size // 2))
    text = full.stdout + full.stderr
    assert full.returncode != 0, text[-3000:]
    says = "File too large" if kind == "cache" else "could not be written ("
    assert says in text, text[-3000:]
    assert not done.exists()
    again = wf.run(f"{RESULTS}/{output}")
    assert again.returncode == 0, (again.stdout + again.stderr)[-3000:]
    ref = reference[0] / RESULTS / output
    if kind == "cache":
        got, want = _store_arrays(done), _store_arrays(ref)
        assert got.keys() == want.keys()
        for name in want:
            np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    else:
        assert (done / big_file).read_bytes() == (ref / big_file).read_bytes()


def test_tiny_filesystem_full_during_cache_write(root, reference, tmp_path):
    """A real ENOSPC: a tmpfs too small for the cache, mounted where the cache goes; then
    remounted larger (space freed) and the job re-run. Needs permission to mount."""
    workdir = _copy_run(reference, tmp_path)
    cache = workdir / RESULTS / "cache"
    saved = tmp_path / "cache"
    shutil.move(cache, saved)
    cache.mkdir()
    mount = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=160k", "tmpfs", str(cache)],
                           capture_output=True, text=True)
    if mount.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mount.stderr.strip()}")
    try:
        wf = _workflow(root, workdir)
        target = f"{RESULTS}/cache/vlm/train/shard0.zarr"
        full = wf.run(target)
        text = full.stdout + full.stderr
        assert full.returncode != 0, text[-3000:]
        assert "No space left on device" in text, text[-3000:]
        assert not (workdir / target).exists()
        subprocess.run(["mount", "-o", "remount,size=64m", str(cache)], check=True)
        again = wf.run(target)
        assert again.returncode == 0, (again.stdout + again.stderr)[-3000:]
        job_log = workdir / RESULTS / "logs/cache/vlm_train_shard0.log"
        assert "resuming" in job_log.read_text()  # from the chunks that fitted
        got = _store_arrays(workdir / target)
        want = _store_arrays(reference[0] / target)
        for name in want:
            np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    finally:
        subprocess.run(["umount", "-l", str(cache)], capture_output=True)
