"""Time the workflow's jobs for a preset: runs snakemake up to a target, then reads the
`benchmark:` files of every job and prints a table (wall seconds, peak RSS) and writes JSON.

    python benchmarks/stage_times.py                      # default preset, world + models
    python benchmarks/stage_times.py --configfile presets/tiny.yaml --target all
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import yaml

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--configfile", default=None, help="preset merged over config.yaml")
    ap.add_argument("--target", default="eval_models", help="rule to build (default: eval_models)")
    ap.add_argument("--cores", default="2")
    ap.add_argument("--run", default=None, help="override the run name")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/out/stage_times.json"))
    args = ap.parse_args()

    cfg = yaml.safe_load((ROOT / "config.yaml").read_text())
    if args.configfile:
        # only `run` is read here, so a shallow merge is enough
        cfg.update(yaml.safe_load(Path(args.configfile).read_text()) or {})
    run = args.run or cfg.get("run", "default")
    cmd = [sys.executable, "-m", "snakemake", "--cores", args.cores, "-s", str(ROOT / "Snakefile"),
           "--directory", str(ROOT), "--forceall", args.target, "--config", f"run={run}"]
    if args.configfile:
        cmd[3:3] = ["--configfile", args.configfile]
    started = time.time()
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True)
    total = time.perf_counter() - t0

    rows = []
    for tsv in sorted((ROOT / "results" / run / "benchmarks").glob("*.tsv")):
        if tsv.stat().st_mtime < started:
            continue  # a job outside this target, left from an earlier run
        b = pd.read_csv(tsv, sep="\t").iloc[-1]
        rows.append({"job": tsv.stem, "wall_s": float(b["s"]), "max_rss_mb": float(b["max_rss"])})
    table = pd.DataFrame(rows)
    print(table.to_string(index=False))
    print(f"total wall time (snakemake, {args.cores} cores): {total:.0f} s")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"run": run, "target": args.target, "cores": args.cores,
                               "total_wall_s": total, "jobs": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
