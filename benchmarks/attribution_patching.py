"""Cost of attribution patching against exact activation patching for the same heads.

Builds a fresh VLM of the default preset's shape (8 layers, 4 query / 2 key-value heads,
hidden 128; `--layers/--heads/--kv-heads/--hidden` change it), draws random images and
questions, and times for one target feature at the last layer: attribution patching (Methods
A and B for every head and variant: two forward and two backward passes) and exact
activation patching of every head, one at a time, for the qk and output variants in both
directions (two clean/corrupt runs plus one forward per head, variant and direction). The
projection to 32 layers x 32 heads scales the pass counts; the time per pass is the measured
one at toy size, so only the ratio carries over to a real model.

    python benchmarks/attribution_patching.py [--batch 8] [--repeats 3] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from datasets import Dataset
from PIL import Image
from vlmdiff.causal import attribution as at
from vlmdiff.inputs import encode_rows
from vlmdiff.models.build import build_lm, build_vlm, make_processor
from vlmdiff.models.tokenizer import build_tokenizer

OUT = Path(__file__).resolve().parent / "out"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    words = "is the red circle left of the blue square above below next to ? yes no"
    tok = build_tokenizer([words])
    lm_cfg = {"hidden_size": args.hidden, "intermediate_size": 3 * args.hidden,
              "num_layers": args.layers, "num_heads": args.heads,
              "num_kv_heads": args.kv_heads, "max_position": 160}
    vision = {"hidden_size": 128, "intermediate_size": 256, "num_layers": 3, "num_heads": 4,
              "patch_size": 8, "feature_layer": -1}
    model = build_vlm(build_lm(tok, lm_cfg, seed=0), tok, vision, 48, seed=0).eval()
    proc = make_processor(tok, 48, 8)
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (48, 48, 3), dtype=np.uint8))
              for _ in range(args.batch)]
    ds = Dataset.from_dict({"question": ["is the red circle left of the blue square?"] * args.batch,
                            "image": images})
    inputs = encode_rows(ds, 0, args.batch, mode="vqa", processor=proc)
    mean = torch.from_numpy(at.mean_image_embedding(model, proc, images, batch_size=args.batch,
                                                    device=torch.device("cpu"),
                                                    log=lambda _: None).values)
    v = torch.randn(args.hidden)
    layer = args.layers - 1
    times = {"attribution": [], "exact": []}
    passes = {"attribution": 4, "exact": 0}
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        at.attribute(model, inputs, layer, v, mean)
        times["attribution"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        _, passes["exact"] = at.exact_patching(model, inputs, layer, v, mean)
        times["exact"].append(time.perf_counter() - t0)
    n_heads = args.layers * args.heads
    per_pass = float(np.median(times["exact"])) / passes["exact"]
    big_heads = 32 * 32
    big_exact = 2 + 2 * len(at.PATCH_VARIANTS) * big_heads
    result = {
        "model": {"layers": args.layers, "heads": args.heads, "kv_heads": args.kv_heads,
                  "hidden": args.hidden, "batch": args.batch,
                  "tokens_per_sample": int(inputs["input_ids"].shape[1])},
        "heads": n_heads,
        "attribution": {"passes": "2 forward + 2 backward", "pass_count": passes["attribution"],
                        "seconds": float(np.median(times["attribution"]))},
        "exact": {"forward_passes": passes["exact"], "seconds": float(np.median(times["exact"]))},
        "speedup": float(np.median(times["exact"]) / np.median(times["attribution"])),
        "projected_32x32": {
            "heads": big_heads,
            "attribution_passes": 4,
            "exact_forward_passes": big_exact,
            "pass_ratio": big_exact / 4,
            "exact_seconds_at_toy_pass_cost": big_exact * per_pass,
        },
        "threads": args.threads,
    }
    rows = [
        ("attribution patching (A + B, all variants)", "2 fwd + 2 bwd",
         f"{result['attribution']['seconds']:.3f}", "4"),
        (f"exact patching ({n_heads} heads x qk/output x 2 directions)",
         f"{passes['exact']} fwd", f"{result['exact']['seconds']:.3f}", "—"),
        ("exact patching projected to 32 x 32 heads", f"{big_exact} fwd",
         f"{big_exact * per_pass:.1f} (at toy pass cost)", "4"),
    ]
    print(f"{'method':<58} {'passes':>12} {'seconds':>28} {'attribution passes':>20}")
    for r in rows:
        print(f"{r[0]:<58} {r[1]:>12} {r[2]:>28} {r[3]:>20}")
    print(f"measured speed-up at toy size: {result['speedup']:.1f}x; pass ratio at 32 x 32: "
          f"{big_exact / 4:.0f}x")
    OUT.mkdir(exist_ok=True)
    path = OUT / "attribution_patching.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
