"""One TopK SAE training step of vlmdiff, sparsify and SAELens, in one process on the same data.

Each library trains its own TopK SAE from the same initial weights (vlmdiff's `from_random`:
unit-norm decoder columns, encoder = decoder transpose, zero biases) with Adam (each as its
trainer builds it) at the same learning rate (`lr_at`'s rule, 2e-4 / sqrt(d_sae / 2**14)) on
the same batches in the same order. A step is what each library's trainer does per batch:

- vlmdiff: `training.optimiser_step` (forward, FVU + AuxK, backward, decoder-gradient
  projection, Adam, unit-norm renormalisation), exactly as `train_sae` runs it;
- sparsify: `SparseCoder.forward` (FVU + AuxK), backward,
  `remove_gradient_parallel_to_decoder_directions`, Adam, `set_decoder_norm_to_unit_norm`
  (its trainer's step with `optimizer="adam"`);
- SAELens: `TopKTrainingSAE.training_forward_pass` (MSE + AuxK), backward, Adam (its default
  TopK config rescales the activations by the decoder norms instead of renormalising).

The libraries take turns step by step, so a load that comes and goes hits all of them alike;
tokens/s is the batch over the median step time. With `--auxk on` a fixed `--dead-fraction` of
the latents counts as dead at every step (the AuxK term runs at its full cost whenever at least
`d_model // 2` latents are dead); with `off` none is. The activations are sparse combinations
of random unit directions plus noise, so the FVU falls with training; the FVU of each SAE on a
held-out batch before and after the same steps shows that faster is not worse.

Sizes (d_model, d_sae, k, batch tokens): toy 128/1024/16/4096, smollm2 576/4608/32/2048,
paper 4096/32768/50/512. The peers come from the `bench` extra (`pip install -e .[bench]`);
one that is not installed is skipped with a note. `--baseline` (repeatable) adds another
checkout's vlmdiff (its `lib/`, e.g. from `git archive <commit> lib | tar -x -C /tmp/<commit>`)
as the library named after the folder above `lib/`, stepped as `train_sae` stepped then (Adam
as built by its `make_optimiser`, else torch's default): before and after a change, in one
process.

    python benchmarks/peer_sae.py [--sizes toy,smollm2,paper] [--auxk on,off] [--steps N]
        [--warmup N] [--threads N] [--libraries vlmdiff,sparsify,saelens]
        [--baseline /tmp/<commit>/lib ...] [--out benchmarks/out/peer_sae.json]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from vlmdiff.sae.topk import TopKSAE, fvu
from vlmdiff.sae.training import make_optimiser, optimiser_step

ROOT = Path(__file__).resolve().parents[1]
SIZES: dict[str, dict[str, int]] = {
    "toy": {"d_model": 128, "d_sae": 1024, "k": 16, "batch_tokens": 4096},
    "smollm2": {"d_model": 576, "d_sae": 4608, "k": 32, "batch_tokens": 2048},
    "paper": {"d_model": 4096, "d_sae": 32768, "k": 50, "batch_tokens": 512},
}
# (warm-up, timed) steps per library when --warmup / --steps are not given
DEFAULT_STEPS = {"toy": (2, 20), "smollm2": (2, 10), "paper": (1, 3)}
LIBRARIES = ("vlmdiff", "sparsify", "saelens")
PEER_MODULES = {"sparsify": "sparsify", "saelens": "sae_lens"}
AUXK_ALPHA = 1 / 32  # sparsify's default, and the weight vlmdiff's trainer gives AuxK


@dataclass
class Trainee:
    """One library's SAE behind two calls: a training step and a reconstruction."""

    name: str
    step: Callable[[Tensor], None]
    reconstruct: Callable[[Tensor], Tensor]


def lr_for(d_sae: int) -> float:
    return 2e-4 / (d_sae / 2**14) ** 0.5


def make_data(spec: dict[str, int], pool: int, seed: int) -> tuple[list[Tensor], Tensor]:
    """`pool` training batches and one held-out batch: k-sparse codes over random unit atoms."""
    gen = torch.Generator().manual_seed(seed)
    d, n, k = spec["d_model"], spec["batch_tokens"], spec["k"]
    n_atoms = min(spec["d_sae"] // 2, 8192)
    atoms = F.normalize(torch.randn(n_atoms, d, generator=gen), dim=1)

    def batch() -> Tensor:
        idx = torch.randint(0, n_atoms, (n, k), generator=gen)
        vals = torch.rand(n, k, generator=gen).pow(2) * 4
        x = F.embedding_bag(idx, atoms, per_sample_weights=vals, mode="sum")
        return x + 0.05 * torch.randn(n, d, generator=gen)

    return [batch() for _ in range(pool)], batch()


def vlmdiff_trainee(init: TopKSAE, dead: Tensor | None) -> Trainee:
    sae = TopKSAE.from_random(init.d_model, init.d_sae, init.k, seed=0)
    sae.load_state_dict(init.state_dict())
    opt = make_optimiser(sae, lr_for(sae.d_sae))
    mask_cache: dict[int, Tensor] = {}

    def step(x: Tensor) -> None:
        mask = mask_cache.setdefault(x.shape[0], torch.ones(x.shape[0], dtype=torch.bool))
        optimiser_step(sae, opt, x, mask, dead, auxk_alpha=AUXK_ALPHA)

    @torch.no_grad()
    def reconstruct(x: Tensor) -> Tensor:
        acts, indices, _ = sae.encode(x)
        return sae.decode(acts, indices)

    return Trainee("vlmdiff", step, reconstruct)


def sparsify_trainee(init: TopKSAE, dead: Tensor | None) -> Trainee:
    from sparsify import SparseCoder, SparseCoderConfig

    cfg = SparseCoderConfig(num_latents=init.d_sae, k=init.k)
    sae = SparseCoder(init.d_model, cfg)
    with torch.no_grad():
        sae.encoder.weight.copy_(init.W_enc)
        sae.encoder.bias.zero_()
        sae.W_dec.copy_(init.W_dec.T)
        sae.b_dec.zero_()
    opt = torch.optim.Adam(sae.parameters(), lr=lr_for(init.d_sae))
    return fvu_trainee("sparsify", sae, opt, lambda x: sae(x, dead_mask=dead))


def fvu_trainee(label: str, sae: Any, opt: torch.optim.Optimizer,
                forward: Callable[[Tensor], Any]) -> Trainee:
    """The step sparsify's trainer takes (FVU + AuxK, decoder-parallel gradient removed, unit
    decoder columns), for any SAE with sparsify's method names: sparsify's own, or vlmdiff's
    from an older checkout."""

    def step(x: Tensor) -> None:
        out = forward(x)
        loss = out.fvu + AUXK_ALPHA * out.auxk_loss
        loss.item()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        opt.step()
        sae.set_decoder_norm_to_unit_norm()

    @torch.no_grad()
    def reconstruct(x: Tensor) -> Tensor:
        acts, indices, _ = sae.encode(x)
        return sae.decode(acts, indices)

    return Trainee(label, step, reconstruct)


def saelens_trainee(init: TopKSAE, dead: Tensor | None) -> Trainee:
    from sae_lens import TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.saes.sae import TrainStepInput

    cfg = TopKTrainingSAEConfig(
        d_in=init.d_model, d_sae=init.d_sae, k=init.k, aux_loss_coefficient=AUXK_ALPHA
    )
    sae = TopKTrainingSAE(cfg)
    with torch.no_grad():
        sae.W_enc.copy_(init.W_enc.T)
        sae.b_enc.zero_()
        sae.W_dec.copy_(init.W_dec.T)
        sae.b_dec.zero_()
    opt = torch.optim.Adam(sae.parameters(), lr=lr_for(init.d_sae))
    n_steps = [0]

    def step(x: Tensor) -> None:
        inp = TrainStepInput(
            sae_in=x,
            coefficients={},
            dead_neuron_mask=dead,
            n_training_steps=n_steps[0],
            is_logging_step=False,
        )
        loss = sae.training_forward_pass(inp).loss
        loss.item()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        n_steps[0] += 1

    @torch.no_grad()
    def reconstruct(x: Tensor) -> Tensor:
        return sae(x)

    return Trainee("saelens", step, reconstruct)


def baseline_builder(label: str, lib: Path) -> Callable[[TopKSAE, Tensor | None], Trainee]:
    """A builder for vlmdiff as of another checkout's `lib/`, imported under its own name."""
    package = "vlmdiff_" + re.sub(r"\W", "_", label)
    root = Path(tempfile.mkdtemp(prefix="peer_sae_baseline_"))
    shutil.copytree(lib / "vlmdiff", root / package)
    for path in (root / package).rglob("*.py"):
        path.write_text(re.sub(r"\bvlmdiff\.", f"{package}.", path.read_text()))
    sys.path.insert(0, str(root))

    def build(init: TopKSAE, dead: Tensor | None) -> Trainee:
        topk = importlib.import_module(f"{package}.sae.topk")
        training = importlib.import_module(f"{package}.sae.training")
        sae = topk.TopKSAE(init.d_model, init.d_sae, init.k)
        sae.load_state_dict(init.state_dict())
        if hasattr(training, "make_optimiser"):
            opt = training.make_optimiser(sae, lr_for(init.d_sae))
        else:
            opt = torch.optim.Adam(sae.parameters(), lr=lr_for(init.d_sae))
        return fvu_trainee(label, sae, opt, lambda x: sae(
            x, dead_mask=dead, loss_mask=torch.ones(x.shape[0], dtype=torch.bool)))

    return build


BUILDERS: dict[str, Callable[[TopKSAE, Tensor | None], Trainee]] = {
    "vlmdiff": vlmdiff_trainee,
    "sparsify": sparsify_trainee,
    "saelens": saelens_trainee,
}


def available(libraries: list[str]) -> tuple[list[str], dict[str, str]]:
    """The libraries that can run, and why each other one cannot."""
    ok, skipped = [], {}
    for lib in libraries:
        module = PEER_MODULES.get(lib)
        if module is not None and importlib.util.find_spec(module) is None:
            skipped[lib] = f"{module} is not installed (pip install -e .[bench])"
        else:
            ok.append(lib)
    return ok, skipped


def run_case(
    size: str, auxk: str, libraries: list[str], args: argparse.Namespace
) -> dict[str, Any]:
    """Warm-up and timed steps of every library in turn at one size and AuxK setting."""
    spec = SIZES[size]
    warmup, steps = DEFAULT_STEPS[size]
    warmup = args.warmup if args.warmup is not None else warmup
    steps = args.steps if args.steps is not None else steps
    batches, held_out = make_data(spec, args.pool, args.seed)
    init = TopKSAE.from_random(spec["d_model"], spec["d_sae"], spec["k"], seed=args.seed)
    dead = None
    if auxk == "on":
        gen = torch.Generator().manual_seed(args.seed + 1)
        dead = torch.rand(spec["d_sae"], generator=gen) < args.dead_fraction

    trainees = []
    for lib in libraries:
        trainees.append(BUILDERS[lib](init, dead))
    del init
    fvu_before = {t.name: float(fvu(held_out, t.reconstruct(held_out))) for t in trainees}
    times: dict[str, list[float]] = {t.name: [] for t in trainees}
    for i in range(warmup + steps):
        x = batches[i % len(batches)]
        for t in trainees:
            start = time.perf_counter()
            t.step(x)
            if i >= warmup:
                times[t.name].append(time.perf_counter() - start)
    fvu_after = {t.name: float(fvu(held_out, t.reconstruct(held_out))) for t in trainees}

    rows = {}
    for t in trainees:
        median = statistics.median(times[t.name])
        rows[t.name] = {
            "tokens_per_s": spec["batch_tokens"] / median,
            "ms_per_step_median": 1e3 * median,
            "step_ms": [1e3 * s for s in times[t.name]],
            "fvu_before": fvu_before[t.name],
            "fvu_after": fvu_after[t.name],
        }
    ratios = {}
    if "vlmdiff" in rows:
        for peer in rows.keys() - {"vlmdiff"}:
            ratios[f"vlmdiff/{peer}"] = rows["vlmdiff"]["tokens_per_s"] / rows[peer]["tokens_per_s"]
    return {
        "size": size,
        **spec,
        "auxk": auxk,
        "dead_fraction": args.dead_fraction if auxk == "on" else 0.0,
        "warmup_steps": warmup,
        "timed_steps": steps,
        "libraries": rows,
        "ratios": ratios,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="toy,smollm2,paper", help=f"of {', '.join(SIZES)}")
    p.add_argument("--auxk", default="on,off", help="on, off or both")
    p.add_argument("--libraries", default=",".join(LIBRARIES))
    p.add_argument("--steps", type=int, default=None, help="timed steps per library")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps before them")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--dead-fraction", type=float, default=0.5, help="latents dead with AuxK on")
    p.add_argument("--pool", type=int, default=4, help="distinct training batches, cycled")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--baseline", type=Path, action="append", default=[], help="a checkout's lib/")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "out" / "peer_sae.json")
    args = p.parse_args()

    sizes = [s for s in args.sizes.split(",") if s]
    auxks = [a for a in args.auxk.split(",") if a]
    wanted = [lib for lib in args.libraries.split(",") if lib]
    if set(sizes) - SIZES.keys() or set(auxks) - {"on", "off"} or set(wanted) - set(LIBRARIES):
        p.error(f"sizes of {list(SIZES)}, auxk of on/off, libraries of {list(LIBRARIES)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    libraries, skipped = available(wanted)
    for lib in args.baseline:
        label = lib.resolve().parent.name
        BUILDERS[label] = baseline_builder(label, lib.resolve())
        libraries.append(label)
    for lib, why in skipped.items():
        print(f"skipping {lib}: {why}")
    warnings.filterwarnings("ignore", module="sparsify")

    load_before = os.getloadavg()[0]
    cases = []
    for size in sizes:
        for auxk in auxks:
            case = run_case(size, auxk, libraries, args)
            cases.append(case)
            print_case(case)
    result = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "versions": versions(libraries),
        "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "load_average_1m_before": load_before,
        "load_average_1m_after": os.getloadavg()[0],
        "skipped": skipped,
        "baselines": [str(lib) for lib in args.baseline],
        "cases": cases,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    figure(result, args.out.with_suffix(".png"))
    print(
        f"torch {result['torch']}, {result['threads']} threads, load average "
        f"{load_before:.1f} -> {result['load_average_1m_after']:.1f} on {result['cpus']} CPUs; "
        f"wrote {args.out} and {args.out.with_suffix('.png')}"
    )


def print_case(case: dict[str, Any]) -> None:
    print(
        f"{case['size']} ({case['d_model']} -> {case['d_sae']}, k {case['k']}, "
        f"{case['batch_tokens']} tokens), AuxK {case['auxk']}, {case['timed_steps']} timed steps"
    )
    for name, row in case["libraries"].items():
        print(
            f"  {name:<9}{row['tokens_per_s']:>11,.0f} tok/s {row['ms_per_step_median']:>10,.1f} "
            f"ms/step   FVU {row['fvu_before']:.4f} -> {row['fvu_after']:.4f}"
        )
    for name, ratio in sorted(case["ratios"].items()):
        print(f"  {name}: {ratio:.2f}x")


def versions(libraries: list[str]) -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    dists = {"vlmdiff": "vlmdiff", "sparsify": "eai-sparsify", "saelens": "sae-lens"}
    out = {}
    for lib in libraries:
        try:
            out[lib] = version(dists.get(lib, "vlmdiff"))
        except PackageNotFoundError:
            out[lib] = "unknown"
    return out


def figure(result: dict[str, Any], path: Path) -> None:
    """Tokens/s of each library per size and AuxK setting, on a log scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = result["cases"]
    libs = list(dict.fromkeys(lib for c in cases for lib in c["libraries"]))
    fig, ax = plt.subplots(figsize=(1.6 + 1.4 * len(cases), 3.2))
    width = 0.8 / max(len(libs), 1)
    for j, lib in enumerate(libs):
        xs = [i + j * width for i, c in enumerate(cases) if lib in c["libraries"]]
        ys = [c["libraries"][lib]["tokens_per_s"] for c in cases if lib in c["libraries"]]
        ax.bar(xs, ys, width, label=lib)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(cases))])
    ax.set_xticklabels([f"{c['size']}\nAuxK {c['auxk']}" for c in cases])
    ax.set_yscale("log")
    ax.set_ylabel("tokens/s (one training step)")
    ax.legend(frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
