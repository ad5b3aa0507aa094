"""Throughput of `write_cache` against a bare forward pass, and memory of streaming reads.

Builds a VLM of the default preset's size with random weights, runs it over random images,
and compares tokens/s of `write_cache` with the same model's backbone forward pass on the
same pre-encoded batches, with encoding + forward done one after the other, and with an
inference loop that encodes and forwards batch by batch (what a cache job cannot avoid: it is
`write_cache` without the hooks and the store). Samples, batch size and chunk size are the
default preset's val cache job's unless given. Runs alternate and each `write_cache` is compared
with the passes just before it, since other processes on a small machine swing timings; the
hooks' own cost is timed A/B per batch. Then writes synthetic
stores of 1x, 3x and 6x the reader's buffer and measures, each in a fresh process, the memory
`iter_batches` takes while streaming them.

`--size large` swaps the default's LM (64 wide, 8 blocks) for one 512 wide (8 blocks, MLP 1536,
8 heads): a store 8x as wide, beside a forward pass about 30x as costly per token.

    python benchmarks/cache_throughput.py [--size default|large] [--samples N] [--threads 1]
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
import tracemalloc
from pathlib import Path

import numpy as np
import torch
import zarr
from datasets import Dataset
from vlmdiff.cache.read import iter_batches
from vlmdiff.cache.store import HOOK_POINT, LAYER_INDEXING, META_DTYPES
from vlmdiff.cache.write import write_cache
from vlmdiff.config import merged_config
from vlmdiff.hooks import ResidCapture, language_layers
from vlmdiff.inputs import encode_rows
from vlmdiff.models.build import build_lm, build_vlm, make_processor
from vlmdiff.models.tokenizer import build_tokenizer
from vlmdiff.world.datasets import noise_vqa

ROOT = Path(__file__).resolve().parents[1]
# `lm` settings laid over the default preset's; random weights, so no download is needed
SIZES: dict[str, dict[str, int]] = {
    "default": {},
    "large": {
        "hidden_size": 512,
        "intermediate_size": 1536,
        "num_layers": 8,
        "num_heads": 8,
        "num_kv_heads": 4,
    },
}
QUESTIONS = [
    "is the red circle left of the blue square",
    "what colour is the triangle",
    "how many shapes are in the image",
    "is there a green square above the yellow circle",
    "what letter is written on the purple shape",
    "is the circle below the triangle",
]


def encode_all(processor, ds: Dataset, batch_size: int) -> list[dict[str, torch.Tensor]]:
    return [
        encode_rows(ds, a, min(a + batch_size, len(ds)), mode="vqa", processor=processor)
        for a in range(0, len(ds), batch_size)
    ]


def hook_cost(model, batches: list[dict], repeats: int, seed: int) -> dict:
    """Backbone forward with and without the capture hooks, alternating per batch.

    Alternating A/B on each batch keeps load from other processes out of the ratio.
    """
    rng = np.random.default_rng(seed)
    times: dict[str, list[float]] = {"bare": [], "hooked": []}
    for _ in range(repeats):
        for batch in batches:
            keep = batch["attention_mask"].bool()
            for kind in rng.permutation(["bare", "hooked"]):
                t0 = time.perf_counter()
                if kind == "bare":
                    with torch.inference_mode():
                        model.model(**batch, use_cache=False)
                else:
                    capture = ResidCapture(language_layers(model), torch.float16)
                    capture.run(model.model, batch, keep, torch.device("cpu"))
                    capture.remove()
                times[kind].append(time.perf_counter() - t0)
    ratios = np.array(times["hooked"]) / np.array(times["bare"])
    return {
        "bare_s_median_per_batch": float(np.median(times["bare"])),
        "hooked_s_median_per_batch": float(np.median(times["hooked"])),
        "hooked_over_bare_median": float(np.median(ratios)),
    }


def throughput(args: argparse.Namespace, work: Path) -> dict:
    """Bare forward, hooked forward and `write_cache` on the same batches of random images."""
    cfg = merged_config()
    cfg["lm"] = {**cfg["lm"], **SIZES[args.size]}
    image_size = cfg["world"]["scene"]["image_size"]
    tok = build_tokenizer(QUESTIONS + [" ".join(cfg["world"]["scene"]["colours"])])
    lm = build_lm(tok, cfg["lm"], seed=0)
    vlm = build_vlm(lm, tok, cfg["vision"], image_size, seed=0).eval()
    processor = make_processor(tok, image_size, cfg["vision"]["patch_size"])
    ds = noise_vqa(QUESTIONS, args.samples, image_size, seed=0)

    batches = encode_all(processor, ds, args.batch_size)
    tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    hooks = hook_cost(vlm, batches, 1, args.seed)
    encode_s, bare_s, loop_s, runs = [], [], [], []
    for rep in range(args.repeats):
        t0 = time.perf_counter()
        batches = encode_all(processor, ds, args.batch_size)
        encode_s.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        with torch.inference_mode():
            for b in batches:
                vlm.model(**b, use_cache=False)
        bare_s.append(time.perf_counter() - t0)
        del batches
        t0 = time.perf_counter()
        inference_loop(vlm, processor, ds, args.batch_size)
        loop_s.append(time.perf_counter() - t0)
        out = work / f"cache_{rep}"
        summary = write_cache(
            vlm,
            ds,
            out,
            mode="vqa",
            processor=processor,
            batch_size=args.batch_size,
            image_tokens_per_sample=args.image_tokens,
            chunk_tokens=args.chunk_tokens,
            log=lambda m: None,
        )
        runs.append({**summary, "store_mib": _du(out) / 2**20})
        shutil.rmtree(out)
    best = min(runs, key=lambda r: r["seconds"])
    # each repeat's write_cache against the bare pass just before it: load shared by the pair
    paired = [r["seconds"] / f for r, f in zip(runs, bare_s, strict=True)]
    paired_seq = [r["seconds"] / (e + f) for r, e, f in zip(runs, encode_s, bare_s, strict=True)]
    paired_loop = [r["seconds"] / t for r, t in zip(runs, loop_s, strict=True)]
    phases = {name: best[f"seconds_{name}"] for name in ("encode", "forward", "store")}
    phases["other"] = best["seconds"] - sum(phases.values())  # create, count, rename
    sequential = min(e + f for e, f in zip(encode_s, bare_s, strict=True))
    return {
        "size": args.size,
        "model": {
            "lm": {k: v for k, v in cfg["lm"].items() if k != "train"},
            "vision": cfg["vision"],
            "image_size": image_size,
            "parameters": sum(p.numel() for p in vlm.parameters()),
        },
        "samples": args.samples,
        "batch_size": args.batch_size,
        "chunk_tokens": args.chunk_tokens,
        "image_tokens_per_sample": args.image_tokens,
        "threads": torch.get_num_threads(),
        "tokens_forwarded": tokens,
        "tokens_stored": best["n_tokens"],
        "store_mib": best["store_mib"],
        "bare_forward_tokens_per_s": tokens / min(bare_s),
        "encode_then_forward_tokens_per_s": tokens / sequential,
        "write_cache_tokens_per_s": tokens / best["seconds"],
        "overhead_vs_forward": best["seconds"] / min(bare_s) - 1,
        "overhead_vs_encode_then_forward": best["seconds"] / sequential - 1,
        "overhead_vs_forward_paired_median": float(np.median(paired)) - 1,
        "overhead_vs_encode_then_forward_paired_median": float(np.median(paired_seq)) - 1,
        "inference_loop_tokens_per_s": tokens / min(loop_s),
        "overhead_vs_inference_loop": best["seconds"] / min(loop_s) - 1,
        "overhead_vs_inference_loop_paired_median": float(np.median(paired_loop)) - 1,
        "hooks": hooks,
        # on a GPU encoding runs on a thread beside the forward pass and `encode` is the wait
        # for it; on a CPU it runs in turn with the forward pass
        "write_cache_phases_s": phases,
        "encode_runs_s": encode_s,
        "bare_forward_runs_s": bare_s,
        "inference_loop_runs_s": loop_s,
        "write_cache_runs_s": [r["seconds"] for r in runs],
    }


def inference_loop(model, processor, ds: Dataset, batch_size: int) -> None:
    """Encode a batch, run the bare forward pass, next batch: an inference loop without caching."""
    with torch.inference_mode():
        for a in range(0, len(ds), batch_size):
            batch = encode_rows(
                ds, a, min(a + batch_size, len(ds)), mode="vqa", processor=processor
            )
            model.model(**batch, use_cache=False)


def synthetic_store(path: Path, n_tokens: int, d_model: int, chunk: int, seed: int) -> None:
    """A complete store with one random layer, in the layout `write_cache` produces."""
    group = zarr.open_group(path, mode="w", zarr_format=3)
    layer = group.create_array(
        "layer_0",
        shape=(n_tokens, d_model),
        chunks=(chunk, d_model),
        dtype="float16",
        dimension_names=("token", "d_model"),
    )
    rng = np.random.default_rng(seed)
    for lo in range(0, n_tokens, chunk):
        hi = min(lo + chunk, n_tokens)
        layer[lo:hi] = rng.standard_normal((hi - lo, d_model), dtype=np.float32).astype(np.float16)
    meta = {
        "sample": np.arange(n_tokens) // 64,
        "position": np.arange(n_tokens) % 64,
        "token_id": np.zeros(n_tokens),
        "is_image": np.arange(n_tokens) % 64 < 36,
    }
    for name, dtype in META_DTYPES.items():
        group.create_array(
            name, data=meta[name].astype(dtype), chunks=(chunk,), dimension_names=("token",)
        )
    group.attrs.update(
        {
            "hook_point": HOOK_POINT,
            "layer_indexing": LAYER_INDEXING,
            "n_layers": 1,
            "d_model": d_model,
            "n_tokens": n_tokens,
            "complete": True,
        }
    )


def read_child(path: str, batch_tokens: int, buffer_chunks: int) -> None:
    """Stream one store, sampling RSS at every batch and tracing allocations; print JSON."""
    zarr.open_group(path, mode="r")["is_image"][:16]  # zarr's machinery up, no layer data read
    base = peak = _rss_mib()
    tracemalloc.start()
    t0, seen, counted = time.perf_counter(), 0, 0
    stream = iter_batches([path], 0, batch_tokens, regime="image", buffer_chunks=buffer_chunks)
    for acts, mask in stream:
        peak = max(peak, _rss_mib())
        seen += len(acts)
        counted += int(mask.sum())
    seconds = time.perf_counter() - t0
    traced_peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    result = {
        "rss_before_mib": base,
        "peak_rss_growth_mib": peak - base,
        "traced_peak_mib": traced_peak / 2**20,
        "tokens": seen,
        "tokens_in_loss": counted,
        "seconds": seconds,
    }
    print(json.dumps(result))


def read_memory(args: argparse.Namespace, work: Path) -> dict:
    """Peak memory of `iter_batches` over stores of 1x, 3x, 6x its buffer, each in a new process."""
    chunk, d, buf = args.read_chunk, args.read_d_model, args.buffer_chunks
    rows = []
    for factor in (1, 3, 6):
        path = work / f"store_x{factor}"
        n = factor * buf * chunk
        synthetic_store(path, n, d, chunk, seed=factor)
        cmd = [
            sys.executable,
            __file__,
            "--read-child",
            str(path),
            "--read-batch",
            str(args.read_batch),
            "--buffer-chunks",
            str(buf),
        ]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True)
        result = json.loads(out.stdout.strip().splitlines()[-1])
        result.update(
            {
                "store_vs_buffer": factor,
                "tokens_in_store": n,
                "store_float16_mib": n * d * 2 / 2**20,
                "store_on_disk_mib": _du(path) / 2**20,
            }
        )
        rows.append(result)
        shutil.rmtree(path)
    return {
        "chunk_tokens": chunk,
        "d_model": d,
        "buffer_chunks": buf,
        "batch_tokens": args.read_batch,
        "buffer_float16_mib": buf * chunk * d * 2 / 2**20,
        "stores": rows,
    }


def _rss_mib() -> float:
    """Current resident set size; the lifetime peak (`ru_maxrss`) where /proc is missing."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _du(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", choices=sorted(SIZES), default="default", help="the LM's shape")
    p.add_argument(
        "--samples", type=int, default=None, help="default: the default preset's val cache job"
    )
    p.add_argument("--batch-size", type=int, default=None, help="default: the preset's")
    p.add_argument("--chunk-tokens", type=int, default=None, help="default: the preset's")
    p.add_argument(
        "--image-tokens", type=int, default=None, help="image tokens kept per sample (all)"
    )
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--read-chunk", type=int, default=4096)
    p.add_argument("--read-d-model", type=int, default=512)
    p.add_argument("--read-batch", type=int, default=4096)
    p.add_argument("--buffer-chunks", type=int, default=4)
    p.add_argument("--out", type=Path, default=None, help="JSON (default: benchmarks/out/)")
    p.add_argument("--no-read", action="store_true", help="skip the reader's memory measurement")
    p.add_argument("--read-child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.read_child:
        read_child(args.read_child, args.read_batch, args.buffer_chunks)
        return

    cache_cfg = merged_config()["cache"]
    args.samples = args.samples or cache_cfg["max_samples"]["val"]
    args.batch_size = args.batch_size or cache_cfg["batch_size"]
    args.chunk_tokens = args.chunk_tokens or cache_cfg["chunk_tokens"]
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.out is None:
        suffix = "" if args.size == "default" else f"_{args.size}"
        args.out = ROOT / "benchmarks" / "out" / f"cache_throughput{suffix}.json"
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="cache_bench_") as tmp:
        write = throughput(args, Path(tmp))
        read = None if args.no_read else read_memory(args, Path(tmp))
    # other processes on the machine skew timings; the load average says how much
    load = {"load_average_1m_before": load_before, "load_average_1m_after": os.getloadavg()[0]}
    result = {"write": write, "read": read, "machine": {"cpus": os.cpu_count(), **load}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")

    report(write, read, result["machine"], args.out)


def report(write: dict, read: dict | None, machine: dict, out: Path) -> None:
    print(
        f"size {write['size']}: {write['model']['parameters']:,} parameters, {write['samples']} samples, "
        f"batch {write['batch_size']}, {write['threads']} threads, "
        f"{write['tokens_forwarded']} tokens"
    )
    rows = [
        ("bare forward (pre-encoded batches)", write["bare_forward_tokens_per_s"], None),
        ("encode, then bare forward", write["encode_then_forward_tokens_per_s"], None),
        (
            "write_cache vs bare forward",
            write["write_cache_tokens_per_s"],
            write["overhead_vs_forward"],
        ),
        (
            "write_cache vs encode + forward",
            write["write_cache_tokens_per_s"],
            write["overhead_vs_encode_then_forward"],
        ),
        ("inference loop (encode, forward)", write["inference_loop_tokens_per_s"], None),
        (
            "write_cache vs inference loop",
            write["write_cache_tokens_per_s"],
            write["overhead_vs_inference_loop"],
        ),
    ]
    print(f"{'pass':<38}{'tokens/s':>10}{'overhead':>10}")
    for name, rate, overhead in rows:
        extra = f"{overhead:>+10.1%}" if overhead is not None else ""
        print(f"{name:<38}{rate:>10.0f}{extra}")
    print(
        f"median of the repeats' own ratios: {write['overhead_vs_forward_paired_median']:+.1%} "
        f"vs bare forward, {write['overhead_vs_encode_then_forward_paired_median']:+.1%} "
        f"vs encode + forward, {write['overhead_vs_inference_loop_paired_median']:+.1%} "
        "vs the inference loop"
    )
    print(
        f"target: overhead <= 10%; hooks alone (A/B per batch): "
        f"{write['hooks']['hooked_over_bare_median'] - 1:+.1%}"
    )
    phases = write["write_cache_phases_s"]
    total = sum(phases.values())
    print("write_cache phases: " + ", ".join(f"{k} {v / total:.0%}" for k, v in phases.items()))
    print(f"store: {write['store_mib']:.1f} MiB for {write['tokens_stored']} tokens")
    if read is not None:
        report_read(read)
    print(
        f"\nload average {machine['load_average_1m_before']:.1f} -> "
        f"{machine['load_average_1m_after']:.1f} on {machine['cpus']} CPUs; wrote {out}"
    )


def report_read(read: dict) -> None:
    print(
        f"\niter_batches: buffer {read['buffer_chunks']} chunks x {read['chunk_tokens']} tokens"
        f" x {read['d_model']} = {read['buffer_float16_mib']:.0f} MiB as stored (float16)"
    )
    print(f"{'store/buffer':<14}{'store MiB':>10}{'RSS growth MiB':>16}{'traced MiB':>12}")
    for r in read["stores"]:
        print(
            f"{r['store_vs_buffer']:<14}{r['store_float16_mib']:>10.0f}"
            f"{r['peak_rss_growth_mib']:>16.0f}{r['traced_peak_mib']:>12.0f}"
        )


if __name__ == "__main__":
    main()
