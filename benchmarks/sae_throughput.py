"""SAE training throughput (tokens/s) and peak memory per layer-SAE, at the toy and paper sizes.

Runs `train_sae` on synthetic activations (standard normal, fixed seed, already on the device)
for a few warm-up and then timed optimiser steps: forward with a loss mask, FVU + AuxK loss,
backward, decoder-gradient projection, Adam step, unit-norm renormalisation. Reading a cache
and copying batches to the device are not included. Each size runs in a fresh process, so its
peak memory is its own: on CUDA `torch.cuda.max_memory_allocated`, on CPU the growth of the
peak resident set size (`ru_maxrss`) over the resident size before the SAE was built. Both are
shown next to the analytic size of the parameters and Adam's two moment buffers.

Sizes: `toy` reads d_model, expansion, k and batch tokens from config.yaml, defaults filled in
from the schema (`lm.hidden_size`, `sae.expansion`, `sae.k`, `sae.adapt.batch_tokens`); `paper` is d_model 4096, d_sae 32768,
k 50, batch 4096 tokens. With `--auxk on` (the default) every latent counts as dead, so the
AuxK term runs on each step at the cost it has whenever at least `k_aux = d_model // 2`
latents are dead; `--auxk off` times steps with no dead latent. On a CPU one paper-size step
is several minutes of a core's time; `--batch-tokens` and `--max-seconds` keep such runs short.

The projection line turns tokens/s into hours for one pass over `--samples` x
`--tokens-per-sample` tokens (one layer-SAE, one regime; the SAE encodes every token whatever
the regime), and for `--layers` x `--regimes` of them one after the other on the same device.

    python benchmarks/sae_throughput.py [--device auto|cpu|cuda] [--threads N] [--steps N]
        [--warmup N] [--max-seconds S] [--sizes toy,paper] [--batch-tokens N] [--auxk on|off]
        [--out benchmarks/out/sae_throughput.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from itertools import pairwise
from pathlib import Path
from typing import Any

import torch
from vlmdiff.config import merged_config
from vlmdiff.sae.topk import TopKSAE
from vlmdiff.sae.training import Batch, TrainConfig, train_sae

ROOT = Path(__file__).resolve().parents[1]
SIZES = ("toy", "paper")
PAPER = {"d_model": 4096, "d_sae": 32768, "k": 50, "batch_tokens": 4096}
# (warm-up, timed) steps when --warmup / --steps are not given
DEFAULT_STEPS = {
    ("toy", "cpu"): (2, 20),
    ("toy", "cuda"): (10, 200),
    ("paper", "cpu"): (1, 3),
    ("paper", "cuda"): (3, 50),
}
MIB = 2**20


def size_spec(name: str, config: Path, batch_tokens: int | None) -> dict[str, int]:
    """d_model, d_sae, k and batch tokens of one size; `batch_tokens` overrides the batch."""
    if name == "paper":
        spec = dict(PAPER)
    elif name == "toy":
        cfg = merged_config(base=config)
        d_model, sae = cfg["lm"]["hidden_size"], cfg["sae"]
        spec = {
            "d_model": d_model,
            "d_sae": d_model * sae["expansion"],
            "k": sae["k"],
            "batch_tokens": sae["adapt"]["batch_tokens"],
        }
    else:
        raise ValueError(f"unknown size {name!r}; choose from {', '.join(SIZES)}")
    if batch_tokens is not None:
        spec["batch_tokens"] = batch_tokens
    return spec


def analytic_mib(d_model: int, d_sae: int) -> dict[str, float]:
    """float32 parameters, their gradients and Adam's exp_avg + exp_avg_sq."""
    n = 2 * d_model * d_sae + d_sae + d_model
    params = n * 4 / MIB
    return {
        "params_mib": params,
        "grads_mib": params,
        "adam_state_mib": 2 * params,
        "params_plus_optimiser_mib": 3 * params,
    }


def synthetic_batches(spec: dict[str, int], pool: int, loss_fraction: float, seed: int, device):
    """`pool` distinct batches of standard-normal activations and their loss masks."""
    gen = torch.Generator().manual_seed(seed)
    n, d = spec["batch_tokens"], spec["d_model"]
    batches = []
    for _ in range(pool):
        acts = torch.randn(n, d, generator=gen)
        mask = torch.rand(n, generator=gen) < loss_fraction
        mask[:2] = True  # FVU needs at least two loss tokens
        batches.append(Batch(acts.to(device), mask.to(device)))
    return batches


def train_config(**fields: Any) -> TrainConfig:
    """`sae.base`'s recipe, run until the batches end, with the benchmark's own `fields` (which
    may leave the config's ranges: dead_tokens_threshold 0 runs AuxK at every step)."""
    base = TrainConfig.from_mapping({}, "sae.base", k=fields["k"], seed=0, device="cpu")
    return dataclasses.replace(base, max_tokens=None, **fields)


def prime(device: torch.device) -> None:
    """Two steps of a tiny SAE, so that the libraries' one-off allocations (kernels, autograd,
    the optimiser's code, the CUDA context) are in place before memory is measured."""
    sae = TopKSAE.from_random(8, 32, 4, seed=0, device=device)
    cfg = train_config(k=4, batch_tokens=16, dead_tokens_threshold=0, device=str(device))
    gen = torch.Generator().manual_seed(0)
    batches = [
        Batch(
            torch.randn(16, 8, generator=gen).to(device),
            torch.ones(16, dtype=torch.bool, device=device),
        )
        for _ in range(2)
    ]
    train_sae(sae, batches, cfg, layer=0, regime="full", log=lambda _: None)


def run_size(
    name: str, spec: dict[str, int], device: torch.device, args: argparse.Namespace
) -> dict[str, Any]:
    """Warm-up and timed steps of `train_sae` for one size, in this process."""
    warmup, steps = DEFAULT_STEPS[(name, device.type)]
    warmup = args.warmup if args.warmup is not None else warmup
    steps = args.steps if args.steps is not None else steps
    cuda = device.type == "cuda"

    prime(device)
    pool = synthetic_batches(spec, args.pool, args.loss_fraction, args.seed, device)
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        mem_before = torch.cuda.memory_allocated(device)
    else:
        mem_before = _rss_bytes()

    sae = TopKSAE.from_random(
        spec["d_model"], spec["d_sae"], spec["k"], seed=args.seed, device=device
    )
    cfg = train_config(
        k=spec["k"],
        batch_tokens=spec["batch_tokens"],
        eval_every_tokens=2**62,
        # 0: every latent is dead, so AuxK runs each step; 2**62: no latent ever dies
        dead_tokens_threshold=0 if args.auxk == "on" else 2**62,
        seed=args.seed,
        device=str(device),
        log_interval_s=math.inf,
    )

    marks: list[float] = []  # when each batch is asked for: the end of the step before

    def batches() -> Iterator[Batch]:
        for i in range(warmup + steps):
            if cuda:
                torch.cuda.synchronize(device)
            marks.append(time.perf_counter())
            timed = len(marks) - 1 - warmup
            if timed >= 1 and args.max_seconds and marks[-1] - marks[warmup] >= args.max_seconds:
                return
            yield pool[i % len(pool)]
        if cuda:
            torch.cuda.synchronize(device)
        marks.append(time.perf_counter())

    result = train_sae(sae, batches(), cfg, layer=0, regime="full", log=lambda _: None)

    if cuda:
        peak = torch.cuda.max_memory_allocated(device) - mem_before
        peak_kind = "cuda max_memory_allocated growth"
    else:
        peak = _peak_rss_bytes() - mem_before
        peak_kind = "peak RSS growth"
    step_s = [b - a for a, b in pairwise(marks)]
    timed_s = step_s[warmup:]
    if not timed_s:
        raise RuntimeError(f"{name}: no timed step ran (warm-up {warmup}, steps {steps})")
    seconds = sum(timed_s)
    rows = len(timed_s) * spec["batch_tokens"]
    loss_tokens = sum(int(pool[i % len(pool)].loss_mask.sum()) for i in range(warmup, len(step_s)))
    return {
        "size": name,
        **spec,
        "warmup_steps": warmup,
        "timed_steps": len(timed_s),
        "timed_seconds": seconds,
        "tokens_per_s": rows / seconds,
        "loss_tokens_per_s": loss_tokens / seconds,
        "ms_per_step_mean": 1e3 * seconds / len(timed_s),
        "ms_per_step_median": 1e3 * statistics.median(timed_s),
        "warmup_ms": [1e3 * s for s in step_s[:warmup]],
        "step_ms": [1e3 * s for s in timed_s],
        "peak_memory_mib": peak / MIB,
        "peak_memory_kind": peak_kind,
        **analytic_mib(spec["d_model"], spec["d_sae"]),
        "train_fvu_last": result.history[-1]["train_fvu"],
        "steps_run": result.steps,
    }


def run_child(args: argparse.Namespace) -> None:
    """Entry point of the per-size process: one size, one JSON line on stdout."""
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    spec = size_spec(args.child, args.config, args.batch_tokens)
    out = run_size(args.child, spec, device, args)
    out["threads"] = torch.get_num_threads()
    print(json.dumps(out))


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    return torch.device(device)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def projection(row: dict[str, Any], args: argparse.Namespace) -> dict[str, float]:
    tokens = args.samples * args.tokens_per_sample
    one = tokens / row["tokens_per_s"] / 3600
    return {
        "tokens_per_layer_regime": tokens,
        "hours_per_layer_regime": one,
        "layers": args.layers,
        "regimes": args.regimes,
        "hours_all": one * args.layers * args.regimes,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per size")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps before them")
    p.add_argument("--max-seconds", type=float, default=None, help="stop timing after this")
    p.add_argument("--sizes", default="toy,paper", help=f"comma-separated, of {', '.join(SIZES)}")
    p.add_argument("--batch-tokens", type=int, default=None, help="override every size's batch")
    p.add_argument("--auxk", choices=["on", "off"], default="on")
    p.add_argument("--loss-fraction", type=float, default=1.0, help="share of tokens in the loss")
    p.add_argument("--pool", type=int, default=4, help="distinct synthetic batches, cycled")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--config", type=Path, default=ROOT / "config.yaml")
    p.add_argument("--samples", type=int, default=50_000)
    p.add_argument("--tokens-per-sample", type=int, default=600)
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--regimes", type=int, default=4)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "out" / "sae_throughput.json")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        run_child(args)
        return

    sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    unknown = sorted(set(sizes) - set(SIZES))
    if unknown or not sizes:
        p.error(f"--sizes: unknown {unknown}; choose from {', '.join(SIZES)}")
    if (args.steps is not None and args.steps < 1) or (args.warmup is not None and args.warmup < 0):
        p.error("--steps must be at least 1 and --warmup at least 0")
    if not 0 < args.loss_fraction <= 1:
        p.error("--loss-fraction must be in (0, 1]")
    device = resolve_device(args.device)

    load_before = os.getloadavg()[0]
    rows = []
    for size in sizes:
        cmd = [sys.executable, __file__, *_child_argv(args, device), "--child", size]
        out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True)
        row = json.loads(out.stdout.strip().splitlines()[-1])
        row["projection"] = projection(row, args)
        rows.append(row)
    threads = rows[0]["threads"]

    result = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "device": device.type,
        "device_name": device_name(device),
        "threads": threads,
        "cpus": os.cpu_count(),
        "load_average_1m_before": load_before,
        "load_average_1m_after": os.getloadavg()[0],
        "auxk": args.auxk,
        "loss_fraction": args.loss_fraction,
        "pool_batches": args.pool,
        "results": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    report(result, args)


def _child_argv(args: argparse.Namespace, device: torch.device) -> list[str]:
    argv = ["--device", device.type, "--threads", str(args.threads)]
    argv += ["--auxk", args.auxk, "--loss-fraction", str(args.loss_fraction)]
    argv += ["--pool", str(args.pool), "--seed", str(args.seed), "--config", str(args.config)]
    for flag, value in (
        ("--steps", args.steps),
        ("--warmup", args.warmup),
        ("--max-seconds", args.max_seconds),
        ("--batch-tokens", args.batch_tokens),
    ):
        if value is not None:
            argv += [flag, str(value)]
    return argv


def report(result: dict[str, Any], args: argparse.Namespace) -> None:
    print(
        f"{result['device_name']} ({result['device']}), {_threads(result['threads'])}, "
        f"torch {result['torch']}, AuxK {result['auxk']}, {result['date']}"
    )
    header = (
        f"{'size':<6}{'d_model':>8}{'d_sae':>7}{'k':>4}{'batch':>6}{'device':>7}{'threads':>8}"
        f"{'steps':>6}{'tokens/s':>11}{'ms/step':>10}{'peak MiB':>10}{'params+Adam MiB':>17}"
    )
    print(header)
    for r in result["results"]:
        print(
            f"{r['size']:<6}{r['d_model']:>8}{r['d_sae']:>7}{r['k']:>4}{r['batch_tokens']:>6}"
            f"{result['device']:>7}{r['threads']:>8}{r['timed_steps']:>6}"
            f"{_rate(r['tokens_per_s']):>11}{r['ms_per_step_mean']:>10,.1f}"
            f"{r['peak_memory_mib']:>10,.0f}{r['params_plus_optimiser_mib']:>17,.0f}"
        )
    kinds = sorted({r["peak_memory_kind"] for r in result["results"]})
    print(f"peak MiB: {', '.join(kinds)}; params+Adam: float32 parameters + exp_avg + exp_avg_sq")
    for r in result["results"]:
        pr = r["projection"]
        print(
            f"projection ({r['size']}, {result['device']}, {_threads(r['threads'])}): "
            f"{_rate(r['tokens_per_s'])} tokens/s -> {args.samples:,} samples x "
            f"{args.tokens_per_sample} tokens = {pr['tokens_per_layer_regime'] / 1e6:g}M tokens "
            f"per layer-SAE and regime: {pr['hours_per_layer_regime']:,.2f} h; "
            f"{pr['layers']} layers x {pr['regimes']} regimes: {pr['hours_all']:,.1f} h "
            f"(one pass, training steps only)"
        )
    print(
        f"load average {result['load_average_1m_before']:.1f} -> "
        f"{result['load_average_1m_after']:.1f} on {result['cpus']} CPUs; wrote {args.out}"
    )


def _rate(tokens_per_s: float) -> str:
    return f"{tokens_per_s:,.0f}" if tokens_per_s >= 100 else f"{tokens_per_s:.3g}"


def _threads(n: int) -> str:
    return f"{n} thread" if n == 1 else f"{n} threads"


def _rss_bytes() -> int:
    """Current resident set size; the lifetime peak where /proc is missing."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return _peak_rss_bytes()


def _peak_rss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB elsewhere


if __name__ == "__main__":
    main()
