"""Start-up of the workflow jobs that only read tables and draw: import time of each script.

Each job's workflow script imports `vlmdiff.logs` and its job module; this times those imports
in a fresh interpreter (`--repeats` times, the jobs taking turns, median reported) and says
whether torch or transformers came with them. `--lib` points at another checkout's `lib/`
(put first on sys.path) to time it in the same run, e.g. the code before a change:

    git archive <commit> lib | tar -x -C /tmp/before
    python benchmarks/startup.py --lib /tmp/before/lib [--repeats 5]
        [--out benchmarks/out/startup.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# job (workflow script) -> the module its script imports
JOBS = {
    "adaptation_figures": "vlmdiff.sae.adaptation",
    "attribution_figures": "vlmdiff.causal.figures",
    "select_features": "vlmdiff.features.selection",
    "threshold_sweep": "vlmdiff.features.selection",
    "ground_truth": "vlmdiff.features.ground_truth",
    "feature_figures": "vlmdiff.features.selection",
    "autointerp_table": "vlmdiff.interp.autointerp",
    "dashboards": "vlmdiff.interp.dashboards",
    "report": "vlmdiff.interp.report",
}
PROBE = """
import sys, time
t = time.perf_counter()
import vlmdiff.logs, {module}
print(time.perf_counter() - t, "torch" in sys.modules, "transformers" in sys.modules,
      sys.modules["vlmdiff"].__file__)
"""


def time_import(module: str, lib: Path | None) -> tuple[float, bool, bool, str]:
    env = dict(os.environ)
    if lib is not None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(lib), env.get("PYTHONPATH")]))
    out = subprocess.run(
        [sys.executable, "-c", PROBE.format(module=module)],
        check=True, capture_output=True, text=True, env=env,
    ).stdout.split()
    return float(out[0]), out[1] == "True", out[2] == "True", out[3]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lib", type=Path, default=None, help="another checkout's lib/ to compare")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "out" / "startup.json")
    args = p.parse_args()

    trees = {"this tree": None} | ({"--lib": args.lib.resolve()} if args.lib else {})
    modules = sorted(set(JOBS.values()))
    seconds: dict[str, dict[str, list[float]]] = {t: {m: [] for m in modules} for t in trees}
    heavy: dict[str, dict[str, list[str]]] = {t: {} for t in trees}
    origin: dict[str, str] = {}
    for _ in range(args.repeats):
        for module in modules:
            for tree, lib in trees.items():
                s, torch, transformers, where = time_import(module, lib)
                seconds[tree][module].append(s)
                heavy[tree][module] = [n for n, on in
                                       (("torch", torch), ("transformers", transformers)) if on]
                origin[tree] = where

    names = list(trees)
    print(f"{'job':<21}" + "".join(f"{n + ' (s)':>14}{'heavy':>20}" for n in names))
    rows = []
    for job, module in JOBS.items():
        row = {"job": job, "module": module}
        line = f"{job:<21}"
        for tree in names:
            med = statistics.median(seconds[tree][module])
            row[tree] = {"median_s": med, "runs_s": seconds[tree][module],
                         "heavy": heavy[tree][module]}
            line += f"{med:>14.2f}{','.join(heavy[tree][module]) or '-':>20}"
        rows.append(row)
        print(line)
    for tree in names:
        print(f"{tree}: vlmdiff from {origin[tree]}")
    result = {"repeats": args.repeats, "load_average_1m": os.getloadavg()[0],
              "trees": {t: str(lib) if lib else str(ROOT / "lib") for t, lib in trees.items()},
              "jobs": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"load average {result['load_average_1m']:.1f}; wrote {args.out}")


if __name__ == "__main__":
    main()
