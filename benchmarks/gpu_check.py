"""Run a preset end to end on CUDA (default: presets/tiny.yaml) and report what ran where.

    python benchmarks/gpu_check.py                          # tiny preset, device cuda
    python benchmarks/gpu_check.py --workdir /scratch/x --cores 8

Training runs under bf16 autocast on CUDA (see vlmdiff.models.training.train); caches are stored in the
preset's `cache.dtype`. The script fails when no CUDA device is visible, when snakemake fails, or
when the training, caching or SAE jobs are never seen holding GPU memory (nvidia-smi is polled). It prints the device, the per-job wall times and the
tiny run's accuracy table, and writes them as JSON.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import torch

ROOT = Path(__file__).resolve().parents[1]


def job_times(bench_dir: Path) -> pd.DataFrame:
    rows = []
    for tsv in sorted(bench_dir.rglob("*.tsv")):
        b = pd.read_csv(tsv, sep="\t").iloc[-1]
        rows.append({"job": str(tsv.relative_to(bench_dir).with_suffix("")), "wall_s": float(b["s"]),
                     "max_rss_mb": float(b["max_rss"])})
    return pd.DataFrame(rows)


class GpuWatcher(threading.Thread):
    """Polls nvidia-smi for the processes holding GPU memory and records which workflow
    scripts they run (snakemake runs `python .snakemake/scripts/tmpXXXX.<script>.py`)."""

    def __init__(self, every_s: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.every_s, self.scripts, self.peak_mib = every_s, set(), 0
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            q = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory",
                                "--format=csv,noheader,nounits"], capture_output=True, text=True)
            for line in q.stdout.splitlines():
                pid, mib = (v.strip() for v in line.split(","))
                self.peak_mib = max(self.peak_mib, int(mib))
                try:
                    cmd = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
                except OSError:
                    continue
                m = re.search(r"tmp[^.]*\.([A-Za-z0-9_]+)\.py", cmd)
                if m:
                    self.scripts.add(m.group(1))
            self.stop.wait(self.every_s)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--configfile", default=str(ROOT / "presets/tiny.yaml"))
    ap.add_argument("--workdir", default="/tmp/vlmdiff_gpu_check")
    ap.add_argument("--cores", default="8")
    ap.add_argument("--gpu-jobs", default="4", help="jobs sharing the GPU at once (tiny jobs fit many)")
    ap.add_argument("--target", default="all")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/out/gpu_check.json"))
    args = ap.parse_args()

    if not torch.cuda.is_available():
        sys.exit("gpu_check: no CUDA device is visible to torch "
                 f"{torch.__version__} (CUDA build: {torch.version.cuda}); nothing was run")
    device = torch.cuda.get_device_name(0)
    print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, {device}, "
          f"bf16 supported: {torch.cuda.is_bf16_supported()}", flush=True)
    run = "gpu_check"
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "snakemake", "--cores", args.cores, "-s", str(ROOT / "Snakefile"),
           "--directory", str(workdir), "--configfile", args.configfile, "--forceall", args.target,
           "--scheduler", "greedy", "--resources", f"gpu={args.gpu_jobs}",
           "--config", f"run={run}", "device=cuda"]
    print(" ".join(cmd), flush=True)
    t0 = time.perf_counter()
    watcher = GpuWatcher()
    watcher.start()
    done = subprocess.run(cmd)
    total = time.perf_counter() - t0
    watcher.stop.set()
    watcher.join()
    results = workdir / "results" / run
    times = job_times(results / "benchmarks")
    if not times.empty:
        print(times.to_string(index=False))
    print(f"snakemake exit {done.returncode}, total wall time {total:.0f} s", flush=True)
    on_gpu = sorted(watcher.scripts)
    print(f"workflow scripts seen holding GPU memory ({len(on_gpu)}): {', '.join(on_gpu) or 'none'}; "
          f"peak per process {watcher.peak_mib} MiB")
    missing = [s for s in ("train_lm", "train_vlm", "cache_activations", "adapt_sae") if s not in on_gpu]
    if missing:
        print("expected on the GPU but never seen there:", ", ".join(missing))
    table = results / "models" / "vlm_eval.csv"
    acc = pd.read_csv(table) if table.exists() else pd.DataFrame()
    if not acc.empty:
        print(acc[acc.family == "all"].to_string(index=False))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "device": device, "torch": torch.__version__, "cuda": torch.version.cuda,
        "exit_code": done.returncode, "total_wall_s": total, "jobs": times.to_dict("records"),
        "scripts_on_gpu": on_gpu, "peak_process_mib": watcher.peak_mib, "not_seen_on_gpu": missing, "accuracy_all": acc[acc.family == "all"].to_dict("records") if not acc.empty else [],
    }, indent=2))
    print(f"wrote {out}")
    if done.returncode or missing:
        sys.exit(1)


if __name__ == "__main__":
    main()
