"""Kill the tiny workflow at seeded moments, several campaigns over, and count what survived.

    python benchmarks/reliability.py                    # seeds 0 1 2, tiny preset, 2 cores
    python benchmarks/reliability.py --seeds 0 1 2 3 4 --workdir /scratch/rel
    python benchmarks/reliability.py --config device=cuda   # on a GPU: what differs there

One uninterrupted run gives the reference tables and each job kind's duration; then each seed
runs the workflow from nothing while SIGKILLing one job of every long kind (and Snakemake with
all its jobs, once) at a moment drawn from 10-60 % of the CPU time the kind took uninterrupted, re-running as a user
would until it finishes, and compares every result file with the reference. Prints one line per
campaign and writes everything to benchmarks/out/reliability.json. The damaged-input and
full-disk cases are the `reliability` tests (`python -m pytest -m reliability`).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from vlmdiff.faults import (
    LONG_JOB_KINDS,
    RESUMING_JOBS,
    SNAKEMAKE_KILL_DURING,
    Workflow,
    compare_runs,
    kill_and_resume,
    plan_kills,
    watch_durations,
)

ROOT = Path(__file__).resolve().parents[1]
RESULTS = "results/tiny"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--cores", type=int, default=2)
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--config", nargs="*", default=[], help="KEY=VALUE overrides for snakemake")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/out/reliability.json")
    args = ap.parse_args()
    base = args.workdir or Path(tempfile.mkdtemp(prefix="vlmdiff-reliability-"))
    config = ROOT / "presets/tiny.yaml"
    extra = ["--config", *args.config] if args.config else []

    ref = Workflow(ROOT / "Snakefile", base / "reference", config, cores=args.cores, extra=extra)
    t0 = time.monotonic()
    durations = watch_durations(ref, base / "reference.txt")
    reference_s = time.monotonic() - t0
    campaigns = []
    for seed in args.seeds:
        wf = Workflow(ROOT / "Snakefile", base / f"seed{seed}", config, cores=args.cores,
                      extra=extra)
        t0 = time.monotonic()
        kills = plan_kills(LONG_JOB_KINDS, SNAKEMAKE_KILL_DURING, seed=seed,
                           resuming=RESUMING_JOBS)
        done = kill_and_resume(wf, wf.workdir / RESULTS, kills, durations,
                               base / f"seed{seed}-runs", log=lambda m: None)
        diff = compare_runs(ref.workdir / RESULTS, wf.workdir / RESULTS)
        row = {"seed": seed, "wall_s": round(time.monotonic() - t0, 1), **done.summary(),
               "tables_differing": diff["tables"], "files_missing": diff["missing"],
               "other_files_differing": diff["other"]}
        campaigns.append(row)
        print(f"seed {seed}: {row['kills_made']}/{row['kills_planned']} kills, "
              f"{row['resumed_from_checkpoint']} resumed from a checkpoint, {row['runs']} runs, "
              f"{row['wall_s']:.0f} s; tables differing {len(diff['tables'])}, missing "
              f"{len(diff['missing'])}, other files differing {diff['other']}", flush=True)
    total = {
        "kills_made": sum(c["kills_made"] for c in campaigns),
        "kills_planned": sum(c["kills_planned"] for c in campaigns),
        "resumed_from_checkpoint": sum(c["resumed_from_checkpoint"] for c in campaigns),
        "campaigns_equal_to_reference": sum(
            not c["tables_differing"] and not c["files_missing"] for c in campaigns),
        "second_run_refused": sum(bool(c["second_run_refused"]) for c in campaigns),
    }
    print(f"all: {total}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"reference_s": round(reference_s, 1), "cores": args.cores,
                                    "total": total, "campaigns": campaigns}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
