"""Time and memory of the feature statistics pass (`vlmdiff.features.stats.split_statistics`).

Writes synthetic stores of growing size in the cache layout (64-token samples, 36 of them image
tokens, as in the default preset) and streams each through a random TopK SAE of the default
preset's shape, each store in a fresh process: wall time, tokens/s, and the growth of peak RSS
over the process's state before the pass. A pass that held the store would grow with it; this
one should stay flat at about one chunk plus one batch of pre-activations.

    python benchmarks/feature_stats.py [--tokens 32768 131072 524288 2097152] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from cache_throughput import _du, synthetic_store  # noqa: E402
from vlmdiff.config import merged_config  # noqa: E402
from vlmdiff.features.stats import split_statistics  # noqa: E402
from vlmdiff.sae.topk import TopKSAE  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def child(path: str, d_sae: int, k: int, batch_tokens: int, n_top: int, threads: int) -> None:
    """Stream one store; print time and peak-RSS growth as JSON."""
    torch.set_num_threads(threads)
    d_model = int(json.loads((Path(path) / "layer_0" / "zarr.json").read_text())["shape"][1])
    sae = TopKSAE.from_random(d_model, d_sae, k, seed=0)
    with torch.no_grad():  # warm up the allocator and kernels on one batch
        sae.encode(torch.randn(batch_tokens, d_model))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t0 = time.perf_counter()
    stats = split_statistics([path], 0, sae, batch_tokens=batch_tokens, n_top=n_top)
    seconds = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    tokens = int(stats["n_tokens"].sum())
    print(
        json.dumps(
            {
                "tokens": tokens,
                "seconds": seconds,
                "tokens_per_s": tokens / seconds,
                "peak_rss_before_mib": before,
                "peak_rss_growth_mib": after - before,
            }
        )
    )


def figure(rows: list[dict], out: Path) -> None:
    """Two panels: seconds and peak-RSS growth against the store's size."""
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.4))
    size = [r["store_float16_mib"] for r in rows]
    a.plot(size, [r["seconds"] for r in rows], marker="o", label="statistics pass")
    a.set_xlabel("store size (MiB, float16)")
    a.set_ylabel("wall time (s)")
    a.set_title("Time grows with the store")
    a.legend(fontsize=7)
    b.plot(size, [r["peak_rss_growth_mib"] for r in rows], marker="o", label="peak RSS growth")
    b.plot(
        size,
        [r["store_float32_mib"] for r in rows],
        ls="--",
        color="0.5",
        label="the store as float32 (what loading it would take)",
    )
    b.set_xlabel("store size (MiB, float16)")
    b.set_ylabel("memory (MiB)")
    b.set_title("Memory does not")
    b.legend(fontsize=7)
    fig.suptitle("Feature statistics pass: time and peak memory against cache size")
    fig.tight_layout()
    fig.savefig(out, bbox_inches="tight")
    plt.close(fig)


def main() -> None:
    cfg = merged_config()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, nargs="+", default=[32768, 131072, 524288, 2097152])
    p.add_argument("--d-model", type=int, default=cfg["lm"]["hidden_size"])
    p.add_argument("--expansion", type=int, default=cfg["sae"]["expansion"])
    p.add_argument("--k", type=int, default=cfg["sae"]["k"])
    p.add_argument("--batch-tokens", type=int, default=cfg["features"]["batch_tokens"])
    p.add_argument("--top", type=int, default=cfg["features"]["top_samples"])
    p.add_argument("--chunk", type=int, default=cfg["cache"]["chunk_tokens"])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "out" / "feature_stats.json")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    d_sae = args.expansion * args.d_model
    if args.child:
        child(args.child, d_sae, args.k, args.batch_tokens, args.top, args.threads)
        return

    rows = []
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="feature_stats_bench_") as tmp:
        for n in args.tokens:
            path = Path(tmp) / f"store_{n}.zarr"
            synthetic_store(path, n, args.d_model, args.chunk, seed=n)
            cmd = [
                sys.executable,
                __file__,
                "--child",
                str(path),
                "--d-model",
                str(args.d_model),
                "--expansion",
                str(args.expansion),
                "--k",
                str(args.k),
                "--batch-tokens",
                str(args.batch_tokens),
                "--top",
                str(args.top),
                "--threads",
                str(args.threads),
            ]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True)
            result = json.loads(out.stdout.strip().splitlines()[-1])
            result.update(
                {
                    "store_float16_mib": n * args.d_model * 2 / 2**20,
                    "store_float32_mib": n * args.d_model * 4 / 2**20,
                    "store_on_disk_mib": _du(path) / 2**20,
                }
            )
            rows.append(result)
            shutil.rmtree(path)
    result = {
        "sae": {"d_model": args.d_model, "d_sae": d_sae, "k": args.k},
        "batch_tokens": args.batch_tokens,
        "top_samples": args.top,
        "chunk_tokens": args.chunk,
        "threads": args.threads,
        "stores": rows,
        "machine": {
            "cpus": os.cpu_count(),
            "load_average_1m_before": load_before,
            "load_average_1m_after": os.getloadavg()[0],
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    figure(rows, args.out.with_suffix(".png"))

    print(
        f"SAE {args.d_model} -> {d_sae} (k={args.k}), batch {args.batch_tokens} tokens, "
        f"chunk {args.chunk} tokens, {args.threads} thread(s)"
    )
    print(f"{'tokens':>9}{'store MiB':>11}{'seconds':>9}{'tokens/s':>10}{'RSS growth MiB':>16}")
    for r in rows:
        print(
            f"{r['tokens']:>9}{r['store_float16_mib']:>11.0f}{r['seconds']:>9.1f}"
            f"{r['tokens_per_s']:>10.0f}{r['peak_rss_growth_mib']:>16.0f}"
        )
    m = result["machine"]
    print(
        f"\nload average {m['load_average_1m_before']:.1f} -> {m['load_average_1m_after']:.1f} "
        f"on {m['cpus']} CPUs; wrote {args.out} and {args.out.with_suffix('.png')}"
    )


if __name__ == "__main__":
    main()
