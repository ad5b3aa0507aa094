"""An SAE training run's resumable state, and its checkpoint: SAE, optimiser, counters, RNG."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from vlmdiff.files import atomic_path
from vlmdiff.sae.topk import TopKSAE

if TYPE_CHECKING:
    from vlmdiff.sae.training import TrainConfig

CHECKPOINT_FILE = "train_state.pt"

# Fields that may change between a run and its resumption without breaking reproducibility.
RESUMABLE_CHANGES = frozenset(
    {"max_tokens", "eval_every_tokens", "checkpoint_every_tokens", "device", "log_interval_s"}
)


@dataclass
class TrainState:
    step: int
    tokens_seen: int
    next_batch: int
    """Index of the next incoming batch to read."""
    next_chunk: int
    """Chunk of that batch to start at; resumption can fall inside a batch."""
    tokens_since_fired: Tensor
    history: list[dict[str, Any]]
    next_eval: int
    next_checkpoint: int | None
    interval_fvu: float = 0.0
    interval_steps: int = 0


def next_multiple(tokens: int, every: int) -> int:
    """The first multiple of `every` above `tokens`."""
    return (tokens // every + 1) * every


def save_checkpoint(
    path: Path,
    sae: TopKSAE,
    opt: torch.optim.Optimizer,
    state: TrainState,
    cfg: TrainConfig,
    layer: int,
    regime: str,
) -> None:
    """Write the full training state to `path` via a temporary file and `os.replace`."""
    payload = {
        "sae": {name: t.detach().cpu() for name, t in sae.state_dict().items()},
        "k": sae.k,
        "optimizer": opt.state_dict(),
        "state": {
            f.name: getattr(state, f.name)
            for f in dataclasses.fields(state)
            if f.name != "tokens_since_fired"
        },
        "tokens_since_fired": state.tokens_since_fired.cpu(),
        "rng": {
            "cpu": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        },
        "cfg": dataclasses.asdict(cfg),
        "layer": layer,
        "regime": regime,
    }
    # a failed write (a full disk) leaves the last whole checkpoint and no litter
    try:
        with atomic_path(path) as tmp:
            torch.save(payload, tmp)
    except (OSError, RuntimeError) as e:  # torch reports a short write as a RuntimeError
        raise OSError(f"checkpoint {path} could not be written ({e}); is the disk full?") from e


def load_checkpoint(
    path: Path,
    sae: TopKSAE,
    opt: torch.optim.Optimizer,
    cfg: TrainConfig,
    layer: int,
    regime: str,
    device: torch.device,
) -> TrainState:
    """Restore SAE, optimiser and RNG from `path`; refuse one written for another run."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(
            f"checkpoint {path} cannot be read ({e}); delete it to train from the start"
        ) from e
    if (payload["layer"], payload["regime"]) != (layer, regime):
        raise ValueError(
            f"checkpoint {path} is for layer {payload['layer']} regime {payload['regime']!r}, "
            f"not layer {layer} regime {regime!r}"
        )
    saved, now = payload["cfg"], dataclasses.asdict(cfg)
    changed = sorted(
        key
        for key in now.keys() | saved.keys()
        if key not in RESUMABLE_CHANGES and saved.get(key) != now.get(key)
    )
    if changed:
        diffs = ", ".join(f"{key}: {saved.get(key)!r} -> {now.get(key)!r}" for key in changed)
        raise ValueError(f"checkpoint {path} was written with a different config ({diffs})")

    sae.load_state_dict(payload["sae"])
    sae.k = payload["k"]
    opt.load_state_dict(payload["optimizer"])
    torch.set_rng_state(payload["rng"]["cpu"])
    if payload["rng"]["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(payload["rng"]["cuda"])

    state = TrainState(**payload["state"], tokens_since_fired=payload["tokens_since_fired"].to(device))
    # Periods may differ from the checkpointed run's; every trigger fired before saving.
    state.next_eval = next_multiple(state.tokens_seen, cfg.eval_every_tokens)
    state.next_checkpoint = (
        next_multiple(state.tokens_seen, cfg.checkpoint_every_tokens)
        if cfg.checkpoint_every_tokens is not None
        else None
    )
    return state
